"""``mixprec.doctor``: which mode a model can take, and which layers to keep.

For every candidate mode the doctor wraps a copy of the model with
``PrecisionWrapper(mode).wrap`` — the mode's own conversion, forward context, loss
scale and optimizer step, so a plugin mode needs nothing special — measures it
against an fp32 copy (``measure``), trains it briefly on the same data from the same
weights (``train``), flags what is wrong and measures a fix where the mode's options
offer one (``recommend``). The user's model is only ever copied.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from .._module import is_wrapped
from .._registry import registry
from .._wrapper import PrecisionWrapper
from ..exceptions import MixprecError, MixprecWarning, WrapError
from .measure import OUTPUT, LossFn, converted_pass, impact_pass, reference_pass
from .recommend import fix_for, flag, options_taken, recommend
from .result import Candidate, DoctorReport, Flag, LayerResult, ModeResult
from .sqnr import FP16_MAX
from .train import LostUpdateRecorder, train_run

__all__ = ["BASELINE", "CORE_ORDER", "default_modes", "doctor"]

BASELINE = "32-true"
#: the core modes in the order the report shows them; plugin modes follow, sorted
CORE_ORDER = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
Progress = Callable[[str, int], Callable[[int], None]]


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def default_modes(model: torch.nn.Module, device: torch.device,
                  include_slow: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Every installed mode this device can run, and those left out with the reason.

    Decided by the tags of the modes' ``ModeSpec``: ``cuda-only`` needs CUDA,
    ``slow-on-cpu`` runs on a CPU only when asked for, and ``frozen-weights`` (quantized,
    frozen weights) only on a model that already trains adapters (some of its
    parameters are frozen).
    """
    entries = registry().modes()
    precision = [n for n, e in entries.items() if e.spec.kind == "precision"]
    optimizers = [n for n, e in entries.items() if e.spec.kind == "optimizer"]
    labels = [m for m in CORE_ORDER if m in entries]
    labels += sorted(n for n in precision if n not in CORE_ORDER)
    labels += [f"{BASELINE}+{n}" for n in sorted(optimizers)]
    adapters = any(not p.requires_grad for p in model.parameters())
    chosen: list[str] = []
    left_out: list[tuple[str, str]] = []
    for label in labels:
        tags = frozenset().union(*(entries[p].spec.tags for p in label.split("+")))
        if "cuda-only" in tags and device.type != "cuda":
            left_out.append((label, "needs a CUDA GPU"))
        elif "slow-on-cpu" in tags and device.type == "cpu" and not include_slow:
            left_out.append((label, "only a slow reference path on a CPU: name it in modes "
                                    "(--modes) to examine it"))
        elif "frozen-weights" in tags and not adapters:
            left_out.append((label, "quantizes and freezes the weights it converts: examine it "
                                    "on a model with adapters (LoRA), e.g. mixprec doctor --lora"))
        else:
            chosen.append(label)
    return chosen, left_out


def _device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _fp32_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            if p.is_floating_point() and p.dtype is not torch.float32:
                p.data = p.data.float()
        for sub in ref.modules():
            for key, buf in sub._buffers.items():
                if buf is not None and buf.is_floating_point() and buf.dtype is not torch.float32:
                    sub._buffers[key] = buf.float()
    return ref


def _candidates(modes: Iterable[str | Candidate]) -> list[Candidate]:
    out: list[Candidate] = []
    for m in modes:
        c = m if isinstance(m, Candidate) else Candidate(str(m))
        if c not in out:
            out.append(c)
    base = Candidate(BASELINE)
    return [base, *(c for c in out if c != base)]


def doctor(
    model: torch.nn.Module, batches: Iterable[Any], *, loss_fn: LossFn,
    modes: Sequence[str | Candidate] | None = None, steps: int = 30, measure_batches: int = 2,
    max_batches: int = 8, optimizer: OptimizerFactory | None = None, lr: float = 1e-3,
    clip: float | None = 1.0, loss_threshold: float = 1.0, sqnr_threshold: float = 35.0,
    lost_threshold: float = 0.5, include_slow: bool = False, fixes: bool = True,
    seed: int = 0, progress: Progress | None = None,
) -> DoctorReport:
    """Examine which precision modes ``model`` can take, on a few batches.

    For each mode, on copies of ``model`` (which is never changed): per layer the
    forward-output SQNR against fp32, the SQNR of the model output with only that
    layer converted (its sensitivity), the weight-gradient SQNR, the fp16 headroom of
    activations and gradients and the share of gradients fp16 flushes to zero at the
    mode's loss scale; over a short training run from the same weights on the same
    data, the loss against fp32, bytes per parameter, step time and the share of each
    layer's updates lost to rounding. Then a recommendation: the cheapest mode (bytes
    per parameter, then step time) within ``loss_threshold`` percent of fp32's loss,
    the ``ignore_modules`` to use with it and the ``mixprec.wrap`` line.

    :param batches: the data; up to ``max_batches`` are used for training (cycled) and
        the first ``measure_batches`` for the per-layer measurements.
    :param loss_fn: ``loss_fn(model, batch) -> loss``: calls the model on a batch and
        returns the scalar loss (compute it in fp32 for a fair comparison).
    :param modes: mode strings to examine (options in brackets:
        ``"bf16-true[master_weights=True]"``); default every installed mode this
        machine can run (see :func:`default_modes`). ``32-true`` is always examined: it
        is the baseline.
    :param steps: optimizer steps of the short training run per mode.
    :param optimizer: ``optimizer(params) -> torch.optim.Optimizer`` for the trainable
        parameters; default ``AdamW(lr=lr)``.
    :param clip: gradient-norm clipping in the training run (None: none).
    :param loss_threshold: the largest loss gap to fp32 (percent) a recommended mode may have.
    :param sqnr_threshold: a layer that alone brings the model output's SQNR below this
        (dB) is kept in full precision where the mode takes ``ignore_modules``.
    :param lost_threshold: a layer losing more than this share of its updates to
        rounding blocks the mode as it is (``master_weights=True`` fixes it where taken).
    :param include_slow: also examine modes tagged ``slow-on-cpu`` on a CPU by default.
    :param fixes: measure the variant that fixes a mode's problems (master weights,
        ignore_modules) where its options offer one.
    :param progress: ``progress(description, total) -> advance(n)`` (progress bars).
    """
    if not isinstance(model, torch.nn.Module):
        raise WrapError(f"doctor() needs a torch.nn.Module, got {type(model).__name__}.")
    if is_wrapped(model):
        raise WrapError("doctor() examines a plain model, and this one is wrapped by mixprec; "
                        "pass mixprec.unwrap(model) or the model before wrap().")
    if not callable(loss_fn):
        raise WrapError("doctor() needs loss_fn(model, batch) -> scalar loss; pass one.")
    if steps < 1 or measure_batches < 1 or max_batches < 1:
        raise WrapError("steps, measure_batches and max_batches must be at least 1.")
    data = list(itertools.islice(iter(batches), max(max_batches, measure_batches)))
    if not data:
        raise WrapError("doctor() got no batches; pass a list (or iterable) of a few batches.")
    train_data = data[:max_batches]
    measured = data[:measure_batches]
    progress = progress or _no_progress
    device = _device_of(model)
    left_out: list[tuple[str, str]] = []
    if modes is None:
        labels, left_out = default_modes(model, device, include_slow)
        candidates = _candidates(labels)
    else:
        candidates = _candidates(modes)
    make_opt = optimizer or (lambda params: torch.optim.AdamW(params, lr=lr))
    params = sum(p.numel() for p in model.parameters())
    lost_steps = max(1, min(10, steps // 2))

    advance = progress("fp32 reference (layers, gradients)", 1)
    reference = reference_pass(_fp32_copy(model), measured, loss_fn)
    advance(1)

    def examine(candidate: Candidate) -> ModeResult:
        return _examine(candidate, model, reference, measured, train_data, loss_fn, make_opt,
                        steps=steps, clip=clip, lost_steps=lost_steps, params=params, seed=seed,
                        progress=progress)

    results = [examine(c) for c in candidates]
    baseline = results[0]
    base_loss = baseline.final_loss if baseline.status == "ok" else None
    thresholds = {"loss_threshold": loss_threshold, "sqnr_threshold": sqnr_threshold,
                  "lost_threshold": lost_threshold}
    for r in results:
        _finish(r, base_loss, thresholds)
    if fixes:
        for r in list(results):
            fix = fix_for(r)
            if fix is not None and all(fix != x.candidate for x in results):
                fixed = examine(fix)
                _finish(fixed, base_loss, thresholds)
                results.append(fixed)
    rec = recommend(results, loss_threshold=loss_threshold, sqnr_threshold=sqnr_threshold)
    return DoctorReport(
        model=type(model).__name__, params=params, device=str(device),
        measure_batches=len(measured), train_batches=len(train_data), steps=steps,
        loss_threshold=loss_threshold, sqnr_threshold=sqnr_threshold,
        lost_threshold=lost_threshold, baseline_loss=base_loss, modes=results,
        left_out=left_out, recommendation=rec,
    )


def _finish(result: ModeResult, base_loss: float | None, thresholds: dict[str, float]) -> None:
    if result.status == "ok" and base_loss and result.final_loss is not None:
        result.gap_pct = 100.0 * (result.final_loss - base_loss) / base_loss
    if result.layers:  # measured (training may have failed after)
        result.flags = flag(result, **thresholds)
    result.flags += [Flag("mode-warning", [], text, blocking=False) for text in result.warnings]


@contextlib.contextmanager
def _mode_warnings(into: list[str]) -> Iterator[None]:
    """Collect the mode's ``MixprecWarning`` s (a conversion freezing weights, a loss
    scale collapsing) into its result, once each, instead of printing them for every
    copy the doctor wraps; other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            others = []
            for w in caught:
                if issubclass(w.category, MixprecWarning):
                    if str(w.message) not in into:
                        into.append(str(w.message))
                else:
                    others.append(w)
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


_ERRORS = (MixprecError, RuntimeError, ValueError, TypeError, ImportError)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, MixprecError) else f"{type(exc).__name__}: {exc}"


def _examine(
    candidate: Candidate, model: torch.nn.Module, reference: Any, measured: list[Any],
    train_data: list[Any], loss_fn: LossFn, make_opt: OptimizerFactory, *, steps: int,
    clip: float | None, lost_steps: int, params: int, seed: int, progress: Progress,
) -> ModeResult:
    """Measure one mode, then train it; a failure in training keeps the measurements."""
    result = ModeResult(candidate, takes=options_taken(candidate.mode))
    advance = progress(f"{candidate.label}: measuring, then {steps} training steps", steps + 1)
    recorder = LostUpdateRecorder()
    with _mode_warnings(result.warnings):
        return _measure_and_train(result, candidate, model, reference, measured, train_data,
                                  loss_fn, make_opt, recorder, advance, steps=steps, clip=clip,
                                  lost_steps=lost_steps, params=params, seed=seed)


def _measure_and_train(
    result: ModeResult, candidate: Candidate, model: torch.nn.Module, reference: Any,
    measured: list[Any], train_data: list[Any], loss_fn: LossFn, make_opt: OptimizerFactory,
    recorder: LostUpdateRecorder, advance: Callable[[int], None], *, steps: int,
    clip: float | None, lost_steps: int, params: int, seed: int,
) -> ModeResult:
    try:
        wrapper = PrecisionWrapper(candidate.mode, monitor=recorder, **dict(candidate.options))
        work = copy.deepcopy(model)
        trainable = [p for p in work.parameters() if p.requires_grad]
        if not trainable:
            raise WrapError("The model has no trainable parameters (requires_grad=True); "
                            "unfreeze some, or add adapters.")
        torch.manual_seed(seed)
        made = make_opt(trainable)
        if not isinstance(made, torch.optim.Optimizer):  # a list: wrap's several optimizers
            raise WrapError(f"doctor(optimizer=...) must return one torch.optim.Optimizer for "
                            f"all trainable parameters, got {type(made).__name__}; the doctor "
                            "trains with one optimizer.")
        wrapped, opt = wrapper.wrap(work, made)
        result.summary = wrapper.summary
        result.loss_scale = wrapper.loss_scale
        result.ignore_modules = tuple(dict(candidate.options).get("ignore_modules") or ())
        scale = wrapper.loss_scale or 1.0
        stats = converted_pass(reference, wrapped, wrapped.module, measured, loss_fn, scale)
        impacts = impact_pass(reference, wrapped.module, measured, loss_fn,
                              wrapper.precision_mode.forward_context, stats)
    except _ERRORS as exc:
        result.status, result.error = "error", _describe(exc)
        return result
    advance(1)
    _layers(result, reference, stats, impacts, scale)
    try:
        torch.manual_seed(seed)
        trained = train_run(wrapped, opt, recorder, train_data, loss_fn, steps=steps, clip=clip,
                            lost_steps=lost_steps, params=params, advance=advance)
    except _ERRORS as exc:
        result.status, result.error = "error", "training failed: " + _describe(exc)
        result.skipped_steps = wrapper.skipped_steps
        return result
    for layer in result.layers:
        layer.lost = recorder.layer_share(layer.name)
    result.final_loss = trained.final_loss
    result.losses = trained.losses
    result.step_ms = trained.step_ms
    result.bytes_per_param = trained.bytes_per_param
    result.weight_bytes = trained.weight_bytes
    result.grad_bytes = trained.grad_bytes
    result.optimizer_bytes = trained.optimizer_bytes
    result.skipped_steps = trained.skipped_steps
    result.lost = recorder.lost.total_share()
    return result


def _layers(result: ModeResult, reference: Any, stats: Any, impacts: dict[str, Any],
            scale: float) -> None:
    """The per-layer results of the measurement passes."""
    result.output_db = stats.output.db
    for name, ref in reference.layers.items():
        out_dtype = stats.out_dtype.get(name)
        fp16 = out_dtype is torch.float16
        impact = impacts.get(name)
        result.layers.append(LayerResult(
            name=name, kind=ref.kind, params=ref.params,
            out_db=stats.out[name].db if name in stats.out else None,
            impact_db=None if impact is None else impact.output.db,
            impact_pct=None if impact is None else 100.0 * impact.loss_change,
            grad_db=stats.grad[name].db if name in stats.grad else None,
            dtype=None if out_dtype is None else str(out_dtype).removeprefix("torch."),
            fp16=fp16, act_amax=ref.act_amax, grad_amax=ref.grad_amax,
            underflow=ref.underflow_share(scale) if fp16 else None,
            overflow=fp16 and (ref.act_amax > FP16_MAX or name in stats.nonfinite),
        ))
    result.layers.append(LayerResult(
        name=OUTPUT, kind="model output", params=0, out_db=stats.output.db,
        impact_db=stats.output.db,
        impact_pct=_mean_change(stats.losses, reference.losses)))


def _mean_change(losses: list[float], base: list[float]) -> float:
    changes = [(a - b) / abs(b) for a, b in zip(losses, base) if b]
    return 100.0 * sum(changes) / len(changes) if changes else math.nan
