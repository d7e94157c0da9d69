"""``mixprec doctor``: which mode a model can take, and which layers to keep, from the shell.

Without ``--model`` it examines the built-in bench GPT on the bench's synthetic
language (``mixprec bench``'s model, data and optimizer settings; ``--lora`` makes it a
LoRA fine-tune of an fp32-pretrained base, so that modes which freeze quantized
weights are examined too). With ``--model pkg.mod:factory`` and ``--data
pkg.mod:batches`` it examines the user's own model. Exit status: 0 when every mode
ran, 1 when a mode named in ``--modes`` could not run here, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .._bench.model import BenchGPT, MarkovTask, lm_loss, lora_targets, parse_size
from .._modestring import split_mode_list
from .report import plot_available, print_report, write_json, write_plot
from .run import doctor

__all__ = ["add_arguments", "default_loss", "run"]

BENCH_LR = 3e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mixprec doctor``."""
    parser.description = (
        "Examine which precision modes a model can take: per-layer SQNR against fp32, "
        "fp16 headroom, updates lost to rounding, the loss after a short run; then "
        "recommend the cheapest mode within the loss threshold, the layers to keep in "
        "full precision (ignore_modules) and the mixprec.wrap line. Default: the "
        "built-in bench GPT.")
    parser.add_argument("--model", default=None, metavar="PKG.MOD:FACTORY",
                        help="your model: a module attribute that is an nn.Module or a "
                             "function returning one (default: the bench GPT)")
    parser.add_argument("--data", default=None, metavar="PKG.MOD:BATCHES",
                        help="your data: an iterable of batches, or a function returning one "
                             "(needed with --model)")
    parser.add_argument("--loss", default=None, metavar="PKG.MOD:FN",
                        help="loss_fn(model, batch) -> scalar loss (default with --model: "
                             "batch is (inputs, targets), cross entropy for integer targets, "
                             "mean squared error for float targets)")
    parser.add_argument("--modes", default=None, metavar="LIST",
                        help="comma-separated modes to examine, options in brackets "
                             "(default: every installed mode this machine can run)")
    parser.add_argument("--steps", type=int, default=30,
                        help="steps of the short training run per mode (default 30)")
    parser.add_argument("--batches", type=int, default=8,
                        help="batches the training run cycles through (default 8); the first "
                             "--measure-batches are measured per layer")
    parser.add_argument("--measure-batches", type=int, default=2,
                        help="batches measured per layer (default 2)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"AdamW learning rate (default {BENCH_LR} on the bench model, "
                             "1e-3 on yours)")
    parser.add_argument("--size", default="small",
                        help="bench model size, as for mixprec bench (default small)")
    parser.add_argument("--lora", action="store_true",
                        help="bench model as a LoRA fine-tune of an fp32-pretrained base "
                             "(needs peft); examines modes that freeze quantized weights")
    parser.add_argument("--loss-threshold", type=float, default=1.0, metavar="PCT",
                        help="largest loss gap to 32-true a recommended mode may have, "
                             "in percent (default 1)")
    parser.add_argument("--sqnr-threshold", type=float, default=35.0, metavar="DB",
                        help="keep a layer in full precision when, converted alone, it brings "
                             "the model output's SQNR below this (default 35 dB)")
    parser.add_argument("--lost-threshold", type=float, default=0.5, metavar="SHARE",
                        help="a layer losing more than this share of its updates to rounding "
                             "blocks a mode (default 0.5)")
    parser.add_argument("--include-slow", action="store_true",
                        help="also examine modes tagged slow-on-cpu (FP8) on a CPU")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="FILE",
                        help="also write every number as JSON")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="also draw per-layer SQNR per mode as a heatmap (needs matplotlib)")
    parser.add_argument("--detail", action="store_true",
                        help="print every measurement of every layer of every mode")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _usage_error(message: str) -> int:
    print(f"mixprec doctor: {message}", file=sys.stderr)
    return 2


class _ArgumentError(Exception):
    pass


def _load(spec: str, what: str) -> Any:
    """``pkg.mod:name`` -> the attribute, called if it is a function (not a module)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise _ArgumentError(f"{what} {spec!r} is not PKG.MOD:NAME; write e.g. "
                             "'mypkg.models:build'.")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules of the current folder
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _ArgumentError(f"cannot import {module_name!r} for {what}: {exc}") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise _ArgumentError(f"module {module_name!r} has no {attr!r} for {what}.") from None
    if callable(obj) and not isinstance(obj, torch.nn.Module) and what != "--loss":
        obj = obj()
    return obj


def default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """``batch`` is ``(inputs, targets)``: cross entropy for integer targets (over the
    last dimension of the output), mean squared error for float targets; in fp32."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError("the default loss needs batches of (inputs, targets); pass --loss "
                        "PKG.MOD:FN with fn(model, batch) -> loss for other batches")
    inputs, targets = batch
    out = model(inputs).float()
    if not targets.is_floating_point():
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                 targets.reshape(-1))
    return torch.nn.functional.mse_loss(out, targets.float())


def _bench_setup(args: argparse.Namespace, device: torch.device,
                 progress: Callable[[str, int], Callable[[int], None]]
                 ) -> tuple[torch.nn.Module, list[Any], Callable[..., torch.Tensor]]:
    size = parse_size(args.size)
    task = MarkovTask(size.vocab, args.seed)
    data = list(task.batches(args.batches, size.batch, size.seq, args.seed + 1).to(device))
    torch.manual_seed(args.seed)
    with torch.device(device):
        model: torch.nn.Module = BenchGPT(size)

    def loss_fn(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return lm_loss(m(batch[:, :-1]), batch[:, 1:])

    if args.lora:
        model = _lora_base(model, task, size, args, device, loss_fn, progress)
    return model, data, loss_fn


def _lora_base(model: torch.nn.Module, task: MarkovTask, size: Any, args: argparse.Namespace,
               device: torch.device, loss_fn: Callable[..., torch.Tensor],
               progress: Callable[[str, int], Callable[[int], None]]) -> torch.nn.Module:
    try:
        import peft
    except ImportError:
        raise _ArgumentError("--lora needs peft: pip install 'mixprec[bench]'.") from None
    pretrain = 4 * args.steps
    base = copy.deepcopy(model)
    opt = torch.optim.AdamW(base.parameters(), lr=BENCH_LR, betas=(0.9, 0.95), weight_decay=0.0)
    advance = progress(f"pretraining the LoRA base ({pretrain} steps, fp32)", pretrain)
    for batch in task.batches(pretrain, size.batch, size.seq, args.seed + 3).to(device):
        loss_fn(base, batch).backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        advance(1)
    torch.manual_seed(args.seed + 4)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets())
    return peft.get_peft_model(base, config)


def _user_setup(args: argparse.Namespace, device: torch.device
                ) -> tuple[torch.nn.Module, list[Any], Callable[..., torch.Tensor]]:
    if args.data is None:
        raise _ArgumentError("--model needs --data PKG.MOD:BATCHES (an iterable of batches).")
    model = _load(args.model, "--model")
    if not isinstance(model, torch.nn.Module):
        raise _ArgumentError(f"--model {args.model} gave a {type(model).__name__}, not a "
                             "torch.nn.Module.")
    data = _load(args.data, "--data")
    try:
        batches = list(_take(iter(data), max(args.batches, args.measure_batches)))
    except TypeError:
        raise _ArgumentError(f"--data {args.data} gave a {type(data).__name__}, which is not "
                             "iterable; return a list or iterable of batches.") from None
    loss_fn = default_loss if args.loss is None else _load(args.loss, "--loss")
    if not callable(loss_fn):
        raise _ArgumentError(f"--loss {args.loss} is not callable.")
    return model.to(device), batches, loss_fn


def _take(it: Iterator[Any], n: int) -> Iterator[Any]:
    for _, item in zip(range(n), it):
        yield item


def run(args: argparse.Namespace) -> int:
    """Run the doctor; return the exit status."""
    from .._bench.cli import _plot_format_problem, _quiet_libraries, unwritable
    from .._bench.report import progress_bars

    if args.steps < 1 or args.batches < 1 or args.measure_batches < 1:
        return _usage_error("--steps, --batches and --measure-batches must be at least 1.")
    if args.plot and not plot_available():
        return _usage_error("--plot needs matplotlib; install it: pip install 'mixprec[bench]'.")
    for flag, path in (("--json", args.json_path), ("--plot", args.plot)):
        problem = path and unwritable(path)  # checked before the run, as mixprec bench does
        if problem:
            return _usage_error(f"{flag} {path}: {problem}")
    if args.plot and (problem := _plot_format_problem(args.plot)):
        return _usage_error(f"--plot {args.plot}: {problem}")
    if args.model is None and args.data is not None:
        return _usage_error("--data goes with --model; without --model the doctor examines "
                            "the bench model on its own data.")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        return _usage_error(f"cannot use device {args.device!r} ({exc}); use cpu or cuda.")
    try:
        parse_size(args.size)
    except ValueError as exc:
        return _usage_error(str(exc))
    modes = None if args.modes is None else split_mode_list(args.modes)
    bench = args.model is None
    lr = args.lr if args.lr is not None else (BENCH_LR if bench else 1e-3)

    def make_opt(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if bench:
            return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        return torch.optim.AdamW(params, lr=lr)

    with _quiet_libraries(), progress_bars(args.quiet) as progress:
        try:
            if bench:
                model, data, loss_fn = _bench_setup(args, device, progress)
            else:
                model, data, loss_fn = _user_setup(args, device)
        except _ArgumentError as exc:
            return _usage_error(str(exc))
        report = doctor(model, data, loss_fn=loss_fn, modes=modes, steps=args.steps,
                        measure_batches=args.measure_batches, max_batches=args.batches,
                        optimizer=make_opt, loss_threshold=args.loss_threshold,
                        sqnr_threshold=args.sqnr_threshold, lost_threshold=args.lost_threshold,
                        include_slow=args.include_slow, seed=args.seed, progress=progress)
    print_report(report, detail=args.detail)
    if args.json_path:
        write_json(report, args.json_path)
    if args.plot:
        write_plot(report, args.plot)
    failed = [m for m in report.modes if m.status != "ok" and m.candidate.fix_of is None]
    if failed and modes is not None:
        names = ", ".join(m.label for m in failed)
        print(f"mixprec doctor: {len(failed)} mode(s) could not run here: {names}.",
              file=sys.stderr)
        return 1
    return 0
