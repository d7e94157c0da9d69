"""Step time of the Transformer Engine modes against ``bf16-mixed``, interleaved.

A stack of pre-norm MLP blocks (LayerNorm, Linear d->4d, GELU, Linear 4d->d) trained
with AdamW on fixed random data, the same initial weights for every mode. Modes take
turns (round robin), so drift in clocks or temperature hits them alike; the median
step time (forward, backward, optimizer step) is reported with CUDA events.

    python plugins/mixprec-te/scripts/te_speed.py --out results/     # on an FP8 GPU
    python plugins/mixprec-te/scripts/te_speed.py --device cpu --dim 64 --layers 1 \\
        --steps 3 --warmup 1 --rounds 1                            # smoke run (no TE)

Modes that cannot run here (TE on a CPU) are reported with the reason, not dropped.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import mixprec


class Block(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.fc1 = torch.nn.Linear(dim, 4 * dim)
        self.fc2 = torch.nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def build(dim: int, layers: int) -> torch.nn.Module:
    return torch.nn.Sequential(*(Block(dim) for _ in range(layers)))


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, start: Any) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        return (time.perf_counter() - start) * 1000.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="bf16-mixed,transformer-engine,transformer-engine-float16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and mode")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="folder for te_speed.json/.md")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    base = build(args.dim, args.layers).to(device)
    x = torch.randn(args.batch, args.seq, args.dim, device=device)
    target = torch.randn_like(x)
    runs: dict[str, dict[str, Any]] = {}
    for mode in args.modes.split(","):
        try:
            model = copy.deepcopy(base)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", mixprec.MixprecWarning)
                model, opt = mixprec.wrap(model, opt, mode=mode)
            runs[mode] = {"model": model, "opt": opt, "times": [], "losses": []}
        except Exception as exc:  # report, do not drop
            runs[mode] = {"error": f"{type(exc).__name__}: {exc}"}
    timer = Timer(device)

    def step(run: dict[str, Any]) -> float:
        loss = torch.nn.functional.mse_loss(run["model"](x), target)
        run["opt"].backward(loss)
        run["opt"].step()
        run["opt"].zero_grad()
        return loss

    live = {m: r for m, r in runs.items() if "error" not in r}
    for run in live.values():
        for _ in range(args.warmup):
            step(run)
    for _ in range(args.rounds):
        for run in live.values():
            for _ in range(args.steps):
                start = timer.start()
                loss = step(run)
                run["times"].append(timer.stop(start))
            run["losses"].append(float(loss.detach()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    ref = statistics.median(live["bf16-mixed"]["times"]) if "bf16-mixed" in live else None
    rows = []
    for mode, run in runs.items():
        if "error" in run:
            rows.append({"mode": mode, "error": run["error"]})
            continue
        median = statistics.median(run["times"])
        rows.append({"mode": mode, "step_ms": round(median, 3),
                     "speedup_vs_bf16_mixed": None if ref is None else round(ref / median, 3),
                     "final_loss": run["losses"][-1], "steps_timed": len(run["times"]),
                     "skipped_steps": run["opt"].precision.skipped_steps})
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": sys.version.split()[0],
        "shape": {"dim": args.dim, "layers": args.layers, "batch": args.batch, "seq": args.seq},
        "rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup,
    }
    try:
        import transformer_engine

        info["transformer_engine"] = transformer_engine.__version__
    except Exception as exc:
        info["transformer_engine"] = f"not available ({type(exc).__name__})"
    lines = [f"# mixprec-te speed, {info['device']}", "",
             f"torch {info['torch']}, Transformer Engine {info['transformer_engine']}, "
             f"{args.layers} blocks of d={args.dim}, batch {args.batch}x{args.seq}, "
             f"median of {args.rounds}x{args.steps} interleaved steps", "",
             "| mode | step ms | speed-up vs bf16-mixed | final loss |", "|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['mode']} | cannot run here: {row['error']} | | |")
        else:
            speed = "" if row["speedup_vs_bf16_mixed"] is None else f"{row['speedup_vs_bf16_mixed']:.2f}x"
            lines.append(f"| {row['mode']} | {row['step_ms']:.2f} | {speed} | {row['final_loss']:.4f} |")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "te_speed.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
        (args.out / "te_speed.md").write_text(text + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
