"""The flight recorder's cost: ``wrap(..., monitor=mixprec.Monitor(every=100))`` against
the same run without it.

Both runs train the bench GPT from the same weights on the same batches, interleaved
in blocks of ``--steps`` steps (default 100 = ``every``, so each block holds exactly
one recorded step). The overhead is the ratio of the median block times (recorded
step included, so its cost is amortised as in training); the median single step and
the recorded step alone are reported too. Target: ratio <= 1.02.

    python benchmarks/monitor_overhead.py                    # numbers (idle machine)
    python benchmarks/monitor_overhead.py --size tiny --steps 10 --every 10 --repeats 2 --tag smoke
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

import mixprec
from mixprec._bench.model import BenchGPT

MODES = ["32-true", "bf16-mixed", "bf16-true"]
TARGET = 1.02
LR, CLIP = 3e-3, 1.0


class Loop:
    """The bench loop through ``mixprec.wrap``, with or without a monitor."""

    def __init__(self, mode: str, model: torch.nn.Module, monitor: mixprec.Monitor | None):
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
        self.model, self.opt = mixprec.wrap(model, opt, mode, monitor=monitor)

    def step(self, batch: torch.Tensor) -> float:
        loss = _common.lm_step(self.model, batch)
        self.opt.backward(loss)
        self.opt.clip_grad_norm_(CLIP)
        self.opt.step()
        self.opt.zero_grad()
        return float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.common_args(parser, steps=100, repeats=7, warmup=5)
    parser.add_argument("--every", type=int, default=100, help="Monitor(every=...) (default 100)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated modes (default {','.join(MODES)})")
    args = parser.parse_args(argv)
    size = _common.size_of(args)
    device = torch.device(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    torch.manual_seed(args.seed)
    with torch.device(device):
        base = BenchGPT(size)
    steps: dict[str, _common.Step] = {}
    monitors: dict[str, mixprec.Monitor] = {}
    for mode in modes:
        steps[f"{mode}/plain"] = Loop(mode, copy.deepcopy(base), None).step
        monitors[mode] = mixprec.Monitor(every=args.every, warn=False)
        steps[f"{mode}/monitor"] = Loop(mode, copy.deepcopy(base), monitors[mode]).step
    data = _common.batches(size, 64, args.seed, device)  # cycled
    timings = _common.time_interleaved(steps, data, warmup=args.warmup, timed=args.steps,
                                       repeats=args.repeats, device=device)
    rows, results = [], []
    for mode in modes:
        plain, watched = timings[f"{mode}/plain"], timings[f"{mode}/monitor"]
        blocks_plain = [sum(r) for r in plain.times_ms]
        blocks_watched = [sum(r) for r in watched.times_ms]
        block_ratio = (statistics.median(blocks_watched) / statistics.median(blocks_plain)
                       if blocks_plain and blocks_watched else None)
        step_ratio = (watched.median_ms / plain.median_ms
                      if watched.median_ms and plain.median_ms else None)
        recorded = [max(r) for r in watched.times_ms if r]
        same = plain.losses == watched.losses
        entry = {
            "mode": mode, "every": args.every, "block_steps": args.steps,
            "plain": {"block_ms": blocks_plain, "median_step_ms": plain.median_ms,
                      "error": plain.error},
            "monitor": {"block_ms": blocks_watched, "median_step_ms": watched.median_ms,
                        "slowest_step_ms": recorded, "records": len(monitors[mode].records),
                        "error": watched.error},
            "block_ratio": block_ratio, "step_ratio": step_ratio,
            "block_ratio_per_repeat": [w / p for w, p in zip(blocks_watched, blocks_plain)],
            "meets_target": None if block_ratio is None else block_ratio <= TARGET,
            "identical_losses": same,
        }
        results.append(entry)
        rows.append([
            mode, _common.fmt(statistics.median(blocks_plain) if blocks_plain else None, 0),
            _common.fmt(statistics.median(blocks_watched) if blocks_watched else None, 0),
            _common.fmt(block_ratio, 3),
            (f"{min(entry['block_ratio_per_repeat']):.3f}–"
             f"{max(entry['block_ratio_per_repeat']):.3f}") if blocks_plain else "—",
            _common.fmt(plain.median_ms), _common.fmt(watched.median_ms),
            _common.fmt(statistics.median(recorded) if recorded else None),
            "yes" if block_ratio is not None and block_ratio <= TARGET else "**no**",
            "yes" if same else "no", _common.short(plain.error or watched.error)])
    table = _common.markdown_table(
        ["mode", f"{args.steps} steps, ms", "with monitor, ms", "ratio", "ratio per repeat",
         "median step, ms", "with monitor", "slowest step with monitor", f"≤ {TARGET}",
         "same losses", "error"], rows)
    notes = [
        f"Monitor(every={args.every}); blocks of {args.steps} steps per implementation per "
        f"repeat, {args.repeats} repeats after {args.warmup} warm-up steps, interleaved (order "
        "rotating each repeat); ratio = median block time with the monitor / without. Each "
        "block holds the recorded step(s), so the ratio includes their cost, amortised.",
        "median step: the median single step (a recorded step is the slowest of its block: "
        "forward hooks, per-layer amax and norms, a copy of the weights for lost updates).",
        "same losses: the monitor only observes; per-step losses are identical.",
    ]
    _common.write_results("monitor_overhead", args,
                          {"size": vars(size), "target": TARGET, "results": results}, table,
                          notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
