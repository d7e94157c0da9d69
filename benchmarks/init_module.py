"""``mixprec.init_module`` against building in fp32 and converting: time and peak memory.

For each mode, a model is built (a) inside ``mixprec.init_module(mode)`` and
(b) in fp32 and then cast (``.to(dtype)``) or, for quantized modes, wrapped.
Peak memory is the most tensor memory live during construction, exact, from
the allocations torch's CPU allocator reports to ``torch.profiler`` (on CUDA the
caching allocator's peak); ``tracemalloc`` cannot be used, it does not see
torch's allocations. Target: ``init_module`` in ``bf16-true`` peaks at no more
than 1.1 x the bf16 model's size (the fp32 model never exists).

    python benchmarks/init_module.py
    python benchmarks/init_module.py --size tiny --repeats 2 --tag smoke
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

import mixprec
from mixprec._bench.memory import PeakTracker, StorageCounter, module_tensors
from mixprec._bench.model import BenchGPT, BenchSize

DEFAULT_SIZE = "vocab=4096,dim=512,layers=8,heads=8,seq=128"
TARGET = 1.1
CAST = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


def builders(mode: str, size: BenchSize, device: torch.device
             ) -> dict[str, Callable[[], torch.nn.Module]]:
    def inside() -> torch.nn.Module:
        with mixprec.init_module(mode, device=device) as precision:
            model = BenchGPT(size)
        if mode not in CAST:  # quantized modes finish at wrap (frozen weights: no optimizer)
            for p in model.parameters():
                p.requires_grad_(False)
            return precision.wrap(model)
        return model

    def convert() -> torch.nn.Module:
        with torch.device(device):
            model = BenchGPT(size)
        if mode in CAST:
            return model.to(CAST[mode])
        for p in model.parameters():
            p.requires_grad_(False)
        return mixprec.wrap(model, mode=mode)

    return {"init_module": inside, "fp32 then convert": convert}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.common_args(parser, size=DEFAULT_SIZE, repeats=5)
    parser.add_argument("--modes", default=None,
                        help="comma-separated modes (default bf16-true, 16-true, and nf4-dq "
                             "when mixprec-bnb is installed)")
    args = parser.parse_args(argv)
    size = _common.size_of(args)
    device = torch.device(args.device)
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    else:
        modes = ["bf16-true", "16-true"] + [m for m in ("nf4-dq",)
                                            if m in mixprec.registry().modes()]
    rows, results = [], []
    for mode in modes:
        build = builders(mode, size, device)
        entry: dict = {"mode": mode}
        times: dict[str, list[float]] = {name: [] for name in build}
        errors: dict[str, str] = {}
        for name, fn in build.items():  # warm-up: the first build imports the mode's library
            try:
                fn()
            except Exception as exc:  # reported in the table
                errors[name] = f"{type(exc).__name__}: {exc}"
        names = [n for n in build if n not in errors]
        for r in range(args.repeats):  # both ways in turn, the order rotating
            for name in names[r % len(names):] + names[:r % len(names)]:
                gc.collect()
                began = time.perf_counter()
                model = build[name]()
                times[name].append((time.perf_counter() - began) * 1e3)
                del model
        for name in build:
            if name in errors:
                entry[name] = {"error": errors[name]}
                continue
            gc.collect()
            tracker = PeakTracker(device)
            with tracker.track():
                model = build[name]()
            inner = model.module if isinstance(model, mixprec.WrappedModule) else model
            size_bytes = StorageCounter().add(module_tensors(inner))
            del model
            entry[name] = {"median_ms": statistics.median(times[name]), "times_ms": times[name],
                           "peak_bytes": tracker.transient, "model_bytes": size_bytes,
                           "peak_over_model": tracker.transient / size_bytes}
        results.append(entry)
        for name in build:
            e = entry[name]
            if "error" in e:
                rows.append([mode, name, "—", "—", "—", "—", "", _common.short(e["error"])])
                continue
            meets = ""
            if name == "init_module" and mode in ("bf16-true", "16-true"):
                meets = "yes" if e["peak_over_model"] <= TARGET else "**no**"
            rows.append([mode, name, _common.fmt(e["median_ms"], 1),
                         _common.fmt(e["model_bytes"] / 2**20), _common.fmt(e["peak_bytes"] / 2**20),
                         _common.fmt(e["peak_over_model"], 3), meets, ""])
    params = sum(p.numel() for p in BenchGPT(BenchSize(**{**vars(size), "layers": 0})).parameters())
    table = _common.markdown_table(
        ["mode", "built by", "time ms", "model MiB", "peak MiB", "peak / model",
         f"≤ {TARGET}", "error"], rows)
    notes = [
        f"model: {size.describe()} (embeddings alone {params:,} parameters).",
        f"time: median over {args.repeats} builds after one warm-up build (which imports "
        "the mode's library), the two ways alternating; peak: tensor memory live at the worst "
        "moment of one build (torch's allocator as reported to torch.profiler on a CPU; the "
        "CUDA caching allocator's peak on a GPU), model: bytes of the finished model's tensors.",
        "init_module(mode) sets the default dtype (and device) while the model is built, so "
        "its parameters are created in the mode's dtype; quantized modes quantize at wrap.",
    ]
    _common.write_results("init_module", args, {"size": vars(size), "target": TARGET,
                                                "results": results}, table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
