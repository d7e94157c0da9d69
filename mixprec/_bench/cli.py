"""``mixprec bench``: train a small built-in model under every installed mode, side by side.

The command a new user runs first. It trains a small GPT (``model``) on
a synthetic language with a known best loss, under every mode the installed
plugins provide (``plan``), interleaved step by step (``run``),
and prints one table of speed, bytes per parameter, peak memory and loss
(``report``). Exit status: 0 when every selected mode ran, 1 when one
could not run here (the others still report), 2 for bad arguments, 130 when
stopped by Ctrl-C.

What comes from outside is checked before anything trains: the size, steps,
device, the ``--modes`` selection, and that ``--json``/``--plot`` can be written
(a bad one is a one-line error, not a traceback after minutes of training). A
Ctrl-C during training prints the table of the steps done, writes the files
asked for, marked partial, and exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

import torch

from .. import registry
from .model import PRESETS, parse_size
from .plan import plan, split_labels
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
    if args.modes is not None and not split_labels(args.modes):
        installed = ", ".join(registry().modes())
        return _usage_error(f"--modes {args.modes!r} names no mode; name one or more of the "
                            f"installed modes ({installed}), or leave --modes out to run "
                            "them all.")
    if args.plot and not plot_available():
        return _usage_error("--plot needs matplotlib; install it: pip install 'mixprec[bench]'.")
    for flag, path in (("--json", args.json_path), ("--plot", args.plot)):
        problem = path and unwritable(path)
        if problem:
            return _usage_error(f"{flag} {path}: {problem}")
    if args.plot and (problem := _plot_format_problem(args.plot)):
        return _usage_error(f"--plot {args.plot}: {problem}")

    choices, left_out = plan(args.modes, device)
    config = BenchConfig(size=size, steps=args.steps, seed=args.seed, device=device,
                         warmup=BenchConfig.warmup_for(args.steps),
                         pretrain_steps=max(1, args.steps // 2))
    try:
        with _quiet_libraries(), progress_bars(args.quiet) as progress:
            result = run_bench(choices, config, progress, left_out)
    except KeyboardInterrupt:  # run_bench reports any Ctrl-C from its first step on
        print("mixprec bench: interrupted before the first training step; nothing was "
              "measured, nothing written.", file=sys.stderr)
        return 130
    print_report(result)
    status = 0
    for flag, path, write in (("--json", args.json_path, write_json),
                              ("--plot", args.plot, write_plot)):
        if path:
            try:
                write(result, path)
            except OSError as exc:  # checked before training; changed since
                print(f"mixprec bench: could not write {flag} {path} ({exc.strerror or exc}); "
                      "the table above holds the results.", file=sys.stderr)
                status = 1
    if result.failed:
        names = ", ".join(f"{r.label} ({r.run})" for r in result.failed)
        print(f"mixprec bench: {len(result.failed)} selected mode(s) could not run here: "
              f"{names}; see the FAILED lines above for why.", file=sys.stderr)
        status = 1
    if result.partial:
        written = [p for p in (args.json_path, args.plot) if p]
        files = ["", ", as is the file written", ", as are the files written"][len(written)]
        print(f"mixprec bench: interrupted after {result.interrupted_after} of "
              f"{result.config.steps} steps; the table above is partial{files}.",
              file=sys.stderr)
        return 130
    return status


def unwritable(path: str) -> str | None:
    """Why ``path`` cannot be written as an output file, or None when it can.

    Checked before training, so a typo costs a second, not the run: the path is
    not a directory, its directory exists, and opening it for writing works (the
    same ``open`` the write does later; a file this creates is removed again and
    an existing one is left as it was).
    """
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        return "is a directory; give a file name in it."
    if not os.path.exists(parent):
        return f"the directory {parent} does not exist; create it or write elsewhere."
    if not os.path.isdir(parent):
        return f"{parent} is not a directory; give a path in a directory."
    if os.path.exists(target) and not os.path.isfile(target):  # a device, a pipe
        if os.access(target, os.W_OK):  # opening a pipe would wait for a reader
            return None
        return "cannot be written (permission denied); choose another path."
    existed = os.path.exists(target)
    try:
        with open(target, "a"):
            pass
    except OSError as exc:
        return f"cannot be written ({exc.strerror or exc}); choose a writable place."
    if not existed:
        with contextlib.suppress(OSError):
            os.remove(target)
    return None


def _plot_format_problem(path: str) -> str | None:
    """Why matplotlib cannot save a figure under ``path``'s suffix, or None."""
    suffix = os.path.splitext(path)[1][1:].lower()
    if not suffix:  # matplotlib saves a PNG then
        return None
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix in formats:
        return None
    return f"matplotlib cannot write .{suffix} files; give a name ending in .png, .pdf or .svg."


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
