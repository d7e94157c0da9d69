"""``mixprec bench``: train a small built-in model under every installed mode, side by side.

The command a new user runs first. It trains a small GPT (``model``) on
a synthetic language with a known best loss, under every mode the installed
plugins provide (``plan``), interleaved step by step (``run``),
and prints one table of speed, bytes per parameter, peak memory and loss
(``report``). Exit status: 0 when every selected mode ran, 1 when one
could not run here (the others still report), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

import torch

from .model import PRESETS, parse_size
from .plan import plan
from .report import plot_available, print_report, progress_bars, write_json, write_plot
from .run import BenchConfig, run_bench

__all__ = ["add_arguments", "run"]

DEFAULT_STEPS = 150


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mixprec bench``."""
    parser.description = (
        "Train a small built-in GPT on a synthetic task under every installed mode, "
        "interleaved, and print step time, speed against 32-true, bytes per parameter, "
        "peak memory, final loss and skipped steps. Modes that freeze quantized weights "
        "(tagged frozen-weights, such as nf4) run as a LoRA fine-tune.")
    parser.add_argument(
        "--modes", default=None, metavar="LIST",
        help="comma-separated modes to run (default: every installed mode this device can "
             "run); options in brackets, e.g. 'bf16-mixed,bf16-true[master_weights=True],"
             "32-true+adamw8bit'. 32-true is always run as the baseline.")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps per mode (default {DEFAULT_STEPS}, at least 3)")
    parser.add_argument(
        "--size", default="small",
        help=f"model and batch size: a preset ({', '.join(PRESETS)}) and/or key=value dims "
             "(vocab, dim, layers, heads, seq, batch, tied), e.g. 'tiny,layers=2' "
             "(default small)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the model, task and data (default 0)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="FILE",
                        help="also write every number, per-step losses and times, as JSON")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="also draw loss curves and memory bars (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _usage_error(message: str) -> int:
    print(f"mixprec bench: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run the bench; return the exit status."""
    try:
        size = parse_size(args.size)
    except ValueError as exc:
        return _usage_error(str(exc))
    if args.steps < 3:
        return _usage_error(f"--steps {args.steps} is too few; use at least 3 (warm-up, "
                            "a measured step, a timed step).")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        return _usage_error(f"Cannot use device {args.device!r} ({exc}); use cpu or cuda.")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _usage_error(f"--device {args.device} asks for CUDA, which this torch "
                            f"{torch.__version__} cannot use here; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        return _usage_error(f"--device {args.device}: the bench measures memory on cpu and "
                            "cuda only; use one of those.")
    if args.plot and not plot_available():
        return _usage_error("--plot needs matplotlib; install it: pip install 'mixprec[bench]'.")

    choices, left_out = plan(args.modes, device)
    config = BenchConfig(size=size, steps=args.steps, seed=args.seed, device=device,
                         warmup=BenchConfig.warmup_for(args.steps),
                         pretrain_steps=max(1, args.steps // 2))
    with _quiet_libraries(), progress_bars(args.quiet) as progress:
        result = run_bench(choices, config, progress, left_out)
    print_report(result)
    if args.json_path:
        write_json(result, args.json_path)
    if args.plot:
        write_plot(result, args.plot)
    if result.failed:
        names = ", ".join(f"{r.label} ({r.run})" for r in result.failed)
        print(f"mixprec bench: {len(result.failed)} selected mode(s) could not run here: "
              f"{names}; see the FAILED lines above for why.", file=sys.stderr)
        return 1
    return 0


#: Import-time notices of the plugins' libraries that say nothing about the run
#: (bitsandbytes offering to fetch CPU kernels from a hub, torchao's CUDA-only
#: extensions, torch.compile deprecations inside torchao), hidden from the table.
_NOISY_LOGGERS = ("bitsandbytes", "torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
