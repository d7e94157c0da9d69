"""Training-step time of the FP8 modes against bf16-mixed, same model and data.

Modes are timed interleaved (one block of steps per mode, round after round) so that
drift of the machine (clocks, other load) hits every mode alike; the report gives the
median over rounds of each mode's time per step and its ratio to ``bf16-mixed``.

    python benchmarks/step_time.py                       # CPU, small (minutes)
    python benchmarks/step_time.py --smoke               # CPU, tiny: checks that it runs
    python benchmarks/step_time.py --device cuda --dim 4096 --layers 4 --tokens 8192 --compile

On a CPU the FP8 GEMMs run torch._scaled_mm's reference kernel, so FP8 is expected to
be much slower there than bf16: the FP8 speed-up is a property of GPUs with FP8 tensor
cores (sm89+: Ada, Hopper). Run it on an idle machine; numbers from a busy one are noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from typing import Any

import torch

import mixprec

DEFAULT_MODES = ["bf16-mixed", "fp8-tensorwise", "fp8-rowwise", "fp8-rowwise-gw-hp"]


class Block(torch.nn.Module):
    """A pre-norm transformer MLP block: the Linear shapes FP8 training is made for."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def build(dim: int, layers: int, device: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*(Block(dim) for _ in range(layers))).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Runner:
    """One mode: its own model copy, optimizer and (optionally compiled) forward."""

    def __init__(self, mode: str, args: argparse.Namespace) -> None:
        self.mode = mode
        self.device = args.device
        model = build(args.dim, args.layers, args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mixprec.MixprecWarning)
            self.model, self.opt = mixprec.wrap(model, opt, mode=mode)
        self.forward = torch.compile(self.model) if args.compile else self.model
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(args.tokens, args.dim, generator=g).to(args.device)
        self.target = torch.randn(args.tokens, args.dim, generator=g).to(args.device)

    def steps(self, n: int) -> float:
        """Run ``n`` training steps; return seconds per step."""
        sync(self.device)
        start = time.perf_counter()
        for _ in range(n):
            loss = torch.nn.functional.mse_loss(self.forward(self.x), self.target)
            self.opt.backward(loss)
            self.opt.step()
            self.opt.zero_grad()
        sync(self.device)
        return (time.perf_counter() - start) / n


def run(args: argparse.Namespace) -> dict[str, Any]:
    runners = [Runner(mode, args) for mode in args.modes]
    for r in runners:
        r.steps(args.warmup)
    times: dict[str, list[float]] = {r.mode: [] for r in runners}
    for round_ in range(args.rounds):
        order = runners if round_ % 2 == 0 else runners[::-1]  # no mode always goes first
        for r in order:
            times[r.mode].append(r.steps(args.steps))
    medians = {mode: statistics.median(ts) for mode, ts in times.items()}
    base = medians.get("bf16-mixed")
    return {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "median_s_per_step": medians,
        "ratio_to_bf16_mixed": {m: (t / base if base else None) for m, t in medians.items()},
        "all_s_per_step": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=256, help="model width (multiple of 16)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256, help="rows per batch")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES)
    parser.add_argument("--compile", action="store_true", help="torch.compile the wrapped model")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one round: checks the script runs, times nothing")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.dim, args.layers, args.tokens, args.steps, args.rounds, args.warmup = 32, 1, 16, 1, 1, 1
    if args.dim % 16:
        parser.error("--dim must be a multiple of 16 (FP8 GEMMs need it)")

    result = run(args)
    print(f"{result['device']}, torch {result['torch']}: dim={args.dim} layers={args.layers} "
          f"tokens={args.tokens}, median of {args.rounds} rounds x {args.steps} steps"
          f"{', compiled' if args.compile else ''}")
    print(f"{'mode':<22}{'ms/step':>12}{'vs bf16-mixed':>16}")
    for mode, seconds in result["median_s_per_step"].items():
        ratio = result["ratio_to_bf16_mixed"][mode]
        shown = f"{ratio:.2f}x" if ratio is not None else "-"
        print(f"{mode:<22}{seconds * 1e3:>12.2f}{shown:>16}")
    if args.smoke:
        print("(smoke run: sizes too small for the times to mean anything)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
