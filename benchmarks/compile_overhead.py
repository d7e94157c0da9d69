"""The wrapper's overhead under ``torch.compile``: compiled mixprec against the same
compiled training loop written in plain torch.

The hand-written loop is ``overhead.py``'s (``.to(dtype)``, ``torch.autocast`` around
the model call, ``torch.amp.GradScaler``), with its model compiled in place
(``model.compile()``). mixprec runs in the README's recommended order, wrap then
``model.compile()`` (input conversion, autocast and output conversion inside the
graph), and in the other order, ``wrap(torch.compile(model))`` (the compiled model
called under the mode). Same model, data, AdamW and clipping; all run interleaved;
the ratio of median step times is the wrapper's cost. Target: ratio <= 1.02.

    python benchmarks/compile_overhead.py                   # numbers (idle machine)
    python benchmarks/compile_overhead.py --size tiny --steps 3 --repeats 2 --warmup 3 --tag smoke
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
from overhead import MixprecLoop, PlainLoop, _adamw

import mixprec
from mixprec._bench.model import BenchGPT

MODES = ["32-true", "bf16-mixed", "16-mixed", "bf16-true"]
TARGET = 1.02
BACKEND = "inductor"


class CompiledPlainLoop(PlainLoop):
    """``overhead.py``'s hand-written loop with the model compiled in place."""

    def __init__(self, mode: str, model: torch.nn.Module, device: torch.device,
                 backend: str) -> None:
        super().__init__(mode, model, device)
        self.model.compile(backend=backend)


class WrapThenCompile(MixprecLoop):
    """mixprec's recommended order: wrap, then compile the wrapped module in place."""

    def __init__(self, mode: str, model: torch.nn.Module, backend: str) -> None:
        super().__init__(mode, model)
        self.model.compile(backend=backend)


class CompileThenWrap(MixprecLoop):
    """The other order: ``wrap(torch.compile(model))``."""

    def __init__(self, mode: str, model: torch.nn.Module, backend: str) -> None:
        self.model, self.opt = mixprec.wrap(torch.compile(model, backend=backend),
                                            _adamw(model.parameters()), mode=mode)


def _build(kind: str, mode: str, model: torch.nn.Module, device: torch.device,
           backend: str) -> PlainLoop | MixprecLoop:
    if kind == "torch":
        return CompiledPlainLoop(mode, model, device, backend)
    if kind == "mixprec":
        return WrapThenCompile(mode, model, backend)
    return CompileThenWrap(mode, model, backend)


def _ratio(t: _common.Timing, plain: _common.Timing) -> float | None:
    return t.median_ms / plain.median_ms if t.median_ms and plain.median_ms else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.common_args(parser, warmup=8)
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated core modes (default {','.join(MODES)})")
    parser.add_argument("--backend", default=BACKEND,
                        help=f"torch.compile backend (default {BACKEND})")
    args = parser.parse_args(argv)
    size = _common.size_of(args)
    device = torch.device(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    # one model class compiled for every implementation and mode: room for all of them
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               4 * len(modes))
    torch.manual_seed(args.seed)
    with torch.device(device):
        base = BenchGPT(size)
    kinds = ("torch", "mixprec", "mixprec-compile-then-wrap")
    steps: dict[str, _common.Step] = {}
    for mode in modes:
        for kind in kinds:
            try:
                steps[f"{mode}/{kind}"] = _build(kind, mode, copy.deepcopy(base), device,
                                                 args.backend).step
            except Exception as exc:  # reported in the table
                steps[f"{mode}/{kind}"] = _common.failing(exc)
    # warm-up compiles every graph (forward and backward) before anything is timed
    data = _common.batches(size, args.warmup + args.steps * args.repeats, args.seed, device)
    timings = _common.time_interleaved(steps, data, warmup=args.warmup, timed=args.steps,
                                       repeats=args.repeats, device=device)
    recompiles = int(torch._dynamo.utils.counters["stats"].get("unique_graphs", 0))

    rows, results = [], []
    for mode in modes:
        plain, wrapped, other = (timings[f"{mode}/{k}"] for k in kinds)
        entry: dict[str, object] = {"mode": mode}
        for key, t in zip(("torch", "mixprec", "mixprec_compile_then_wrap"),
                          (plain, wrapped, other), strict=True):
            entry[key] = {"median_ms": t.median_ms, "repeat_medians_ms": t.repeat_medians,
                          "final_loss": t.losses[-1] if t.losses else None, "error": t.error}
        r, r_other = _ratio(wrapped, plain), _ratio(other, plain)
        per_repeat = [w / p for w, p in zip(wrapped.repeat_medians, plain.repeat_medians)]
        n = min(len(plain.losses), len(wrapped.losses))
        loss_gap = max((abs(a - b) / abs(a) for a, b in
                        zip(plain.losses[:n], wrapped.losses[:n])), default=None)
        entry.update(ratio=r, ratio_compile_then_wrap=r_other, ratio_per_repeat=per_repeat,
                     meets_target=None if r is None else r <= TARGET,
                     max_relative_loss_difference=loss_gap)
        results.append(entry)
        spread = f"{min(per_repeat):.3f}–{max(per_repeat):.3f}" if per_repeat else "—"
        rows.append([mode, _common.fmt(plain.median_ms), _common.fmt(wrapped.median_ms),
                     _common.fmt(r, 3), spread, _common.fmt(other.median_ms),
                     _common.fmt(r_other, 3),
                     "yes" if r is not None and r <= TARGET else "**no**",
                     "—" if loss_gap is None else f"{loss_gap:.1e}",
                     _common.short(plain.error or wrapped.error or other.error)])
    table = _common.markdown_table(
        ["mode", "torch ms", "mixprec ms", "ratio", "ratio per repeat",
         "compile-then-wrap ms", "its ratio", f"≤ {TARGET}", "loss gap", "error"], rows)
    notes = [
        f"ms: median step time (compiled forward, backward, clip_grad_norm_, AdamW step, "
        f"zero_grad) over {args.repeats} repeats x {args.steps} steps after {args.warmup} "
        f"warm-up steps that compile every graph; torch.compile backend {args.backend!r}; "
        "implementations interleaved, order rotating each repeat.",
        "torch: overhead.py's hand-written loop, model.compile() in place, autocast around "
        "the model call. mixprec: wrap, then model.compile() (the README's order). "
        "compile-then-wrap: mixprec.wrap(torch.compile(model)). ratio: mixprec / torch.",
        "mixprec checks gradients for inf/NaN in every mode (skip_nonfinite=True, one read "
        "of the gradients; with clipping the clipping norm is that check).",
        "loss gap: the largest relative difference of mixprec's per-step losses from the "
        "hand-written loop's (the graphs differ: mixprec's output cast to fp32 is inside it, "
        "so inductor may fuse it differently).",
        f"graphs compiled in the whole run: {recompiles}.",
    ]
    _common.write_results("compile_overhead", args,
                          {"size": vars(size), "target": TARGET, "backend": args.backend,
                           "results": results}, table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
