"""``mixprec.Monitor``: a flight recorder for training in low precision.

``wrap(model, opt, mode, monitor=mixprec.Monitor(every=100))`` records, every
``every`` steps, per layer the largest |activation| and |gradient|, the gradient
norm, the fp16 underflow share (modes that scale the loss) and the share of updates
lost to rounding, plus the loss scale and the total gradient norm, into a bounded
in-memory history, optionally a JSON-lines file and a callback. It warns once per
cause, early: an activation amax approaching fp16's limit, a layer whose updates
mostly round away, a loss scale stuck far below what the gradients allow, a layer
whose gradient norm jumps by orders of magnitude.

Between recorded steps it costs two attribute checks per step: the hooks are
registered just before a recorded step's forward and removed after its
optimizer step. It observes through the wrapper's step seam
(:class:`mixprec.StepHooks`), so it works with every mode, plugin modes included.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._audit import recorder_of
from ._doctor.measure import is_layer
from ._doctor.sqnr import FP16_MAX, FP16_MIN_NORMAL, LostUpdates, amax, float_tensors
from ._options import check_number
from ._tensors import local_tensor
from ._warn import warn_user

if TYPE_CHECKING:
    from ._wrapper import PrecisionWrapper

__all__ = ["Monitor"]

Record = dict[str, Any]


class _Layer:
    """What one recorded step saw of one layer."""

    __slots__ = ("act_amax", "dtype", "grad_amax", "small", "total")

    def __init__(self) -> None:
        self.act_amax = 0.0
        self.grad_amax = 0.0
        self.dtype: torch.dtype | None = None
        self.small = 0  # output-gradient elements below fp16's smallest normal (scaled)
        self.total = 0


class Monitor:
    """Records per-layer numerics every ``every`` steps and warns early (see the module
    docstring). Pass it to ``wrap(..., monitor=Monitor())``; one monitor per wrapper.

    :param every: record every this many optimizer steps (steps 0, every, 2 * every, …).
    :param history: how many records to keep in memory (the oldest go first).
    :param path: also append each record to this JSON-lines file.
    :param callback: also call ``callback(record)`` with each record (a dict).
    :param warn: warn (``mixprec.MixprecWarning``) once per cause.
    :param headroom: warn when an fp16 activation's amax comes within this factor of
        fp16's largest value (65504), or is on course to within ten records.
    :param lost_share: warn when a layer loses more than this share of its updates.
    :param scale_gap: warn when the loss scale stays this factor below what the
        gradients allow (65504 / their largest magnitude) for two records.
    :param jump: warn when a layer's gradient norm grows by this factor between records.
    """

    def __init__(
        self, every: int = 100, *, history: int = 1000, path: str | Path | None = None,
        callback: Callable[[Record], Any] | None = None, warn: bool = True,
        headroom: float = 8.0, lost_share: float = 0.5, scale_gap: float = 2.0**10,
        jump: float = 100.0,
    ) -> None:
        self.every = int(check_number(every, "every", minimum=1, integer=True))
        self.records: deque[Record] = deque(
            maxlen=int(check_number(history, "history", minimum=1, integer=True)))
        self.path = None if path is None else Path(path)
        self.callback = callback
        self.warn = bool(warn)
        self.headroom = float(check_number(headroom, "headroom", minimum=1))
        self.lost_share = float(lost_share)
        self.scale_gap = float(check_number(scale_gap, "scale_gap", minimum=1))
        self.jump = float(check_number(jump, "jump", minimum=1))
        #: causes warned about so far (each warns once)
        self.warned: set[str] = set()
        self._wrapper: PrecisionWrapper | None = None
        self._layers: dict[str, torch.nn.Module] = {}
        self._seen: dict[str, _Layer] = {}
        self._handles: list[Any] = []
        self._lost = LostUpdates()
        self._step: int | None = None  # the step being recorded
        self._grads: dict[str, tuple[float, float]] = {}

    # -- StepHooks ---------------------------------------------------------------------

    def attach(self, wrapper: PrecisionWrapper) -> None:
        """Called by ``wrap``: find the layers and arm the first recorded step."""
        if self._wrapper is not None and self._wrapper is not wrapper:
            from .exceptions import WrapError

            raise WrapError("This Monitor already watches another wrapped model; give each "
                            "wrap() its own mixprec.Monitor().")
        self._wrapper = wrapper
        assert wrapper.module is not None
        inner = wrapper.module.module
        self._layers = {n: m for n, m in inner.named_modules() if n and is_layer(m)}
        self._hooks = {n: self._on_forward(n) for n in self._layers}
        recorder_of(wrapper)  # audit() then sees the forward and the loss from the start
        if wrapper.steps % self.every == 0:
            self._arm(wrapper.steps)

    def before_step(self, wrapper: PrecisionWrapper) -> None:
        if self._step is None:
            return
        grads: dict[str, list[torch.Tensor]] = {}
        for p in wrapper.step_parameters():
            if p.grad is not None:
                grads.setdefault(_layer_of(wrapper.param_name(p)), []).append(
                    local_tensor(p.grad))
        self._grads = {name: (_norm(gs), amax(gs)) for name, gs in grads.items()}
        if not wrapper.step_will_be_skipped:
            self._lost.before([(wrapper.param_name(p), p) for p in wrapper.step_parameters()])

    def after_step(self, wrapper: PrecisionWrapper, skipped: bool) -> None:
        if self._step is not None:
            self._finish(wrapper, skipped)
        if wrapper.steps % self.every == 0:  # the next step is recorded: hooks on
            self._arm(wrapper.steps)

    def _finish(self, wrapper: PrecisionWrapper, skipped: bool) -> None:
        assert self._step is not None
        lost = self._lost.after(taken=not skipped)
        self._lost.counts.clear()
        record = self._record(wrapper, self._step, skipped, lost)
        self._disarm()
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(_plain(record), allow_nan=False) + "\n")
        if self.callback is not None:
            self.callback(record)
        if self.warn:
            self._check(record)

    # -- recording ---------------------------------------------------------------------

    @property
    def history(self) -> list[Record]:
        """The records kept, oldest first."""
        return list(self.records)

    def _arm(self, step: int) -> None:
        self._step = step
        self._seen = {name: _Layer() for name in self._layers}
        for name, module in self._layers.items():
            self._handles.append(module.register_forward_hook(self._hooks[name]))

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._step = None
        self._grads = {}

    def _on_forward(self, name: str) -> Callable[..., None]:
        """The forward hook of layer ``name``: made once, registered for each recorded
        step, and run outside torch.compile's graphs (it reads values into Python), so a
        compiled model is traced with the same hook each time instead of again per record."""

        @torch.compiler.disable
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            seen = self._seen[name]
            tensors = float_tensors(output)
            if not tensors:
                return
            seen.dtype = tensors[0].dtype
            with torch.no_grad():
                seen.act_amax = max(seen.act_amax, amax(tensors))
            for t in tensors:
                if t.requires_grad:
                    t.register_hook(lambda g: self._on_grad(seen, g))
        return hook

    def _on_grad(self, seen: _Layer, grad: torch.Tensor) -> None:
        wrapper = self._wrapper
        scale = 1.0 if wrapper is None or wrapper.loss_scale is None else wrapper.loss_scale
        with torch.no_grad():
            g = local_tensor(grad)
            seen.grad_amax = max(seen.grad_amax, amax([g]) / scale)
            if wrapper is not None and wrapper.scaler is not None:
                seen.small += int((g.abs() < FP16_MIN_NORMAL).sum())
                seen.total += g.numel()

    def _record(self, wrapper: PrecisionWrapper, step: int, skipped: bool,
                lost: dict[str, tuple[int, int]]) -> Record:
        layers: dict[str, dict[str, Any]] = {}
        for name, seen in self._seen.items():
            norm, gmax = self._grads.get(name, (None, None))
            shares = [lo / n for key, (lo, n) in lost.items() if _layer_of(key) == name and n]
            layers[name] = {
                "act_amax": seen.act_amax,
                "dtype": None if seen.dtype is None else str(seen.dtype).removeprefix("torch."),
                "grad_amax": max(seen.grad_amax, gmax or 0.0),
                "grad_norm": norm,
                "underflow": seen.small / seen.total if seen.total else None,
                "lost": max(shares) if shares else None,
            }
        norms = [v[0] for v in self._grads.values()]
        gmax = max((v["grad_amax"] for v in layers.values()), default=0.0)
        return {
            "step": step, "skipped": skipped, "loss_scale": wrapper.loss_scale,
            "grad_norm": math.sqrt(sum(n * n for n in norms)) if norms else None,
            # the largest loss scale fp16 gradients allow: 65504 / their largest |value|
            "scale_allowed": FP16_MAX / gmax if gmax and math.isfinite(gmax) else None,
            "layers": layers,
        }

    # -- early warnings ----------------------------------------------------------------

    def _warn_once(self, cause: str, message: str) -> None:
        if cause not in self.warned:
            self.warned.add(cause)
            warn_user(f"mixprec.Monitor: {message}")

    def _check(self, record: Record) -> None:
        step = record["step"]
        previous = self.records[-2] if len(self.records) > 1 else None
        for name, layer in record["layers"].items():
            if layer["dtype"] == "float16":
                self._check_headroom(name, layer, step)
            lost = layer["lost"]
            if lost is not None and lost > self.lost_share:
                self._warn_once(
                    "lost-updates",
                    f"at step {step}, {100 * lost:.0f}% of the updates of layer {name!r} "
                    "round away (each smaller than half a unit in the last place of its "
                    "weights): train with fp32 master weights (master_weights=True) or a "
                    "mixed mode.")
            if previous is None:
                continue
            before = previous["layers"].get(name, {}).get("grad_norm")
            now = layer["grad_norm"]
            if before and now is not None and math.isfinite(now) and now > self.jump * before:
                self._warn_once(
                    "grad-norm-jump",
                    f"the gradient norm of layer {name!r} jumped from {before:.3g} at step "
                    f"{previous['step']} to {now:.3g} at step {step} "
                    f"({now / before:.0f}x): check the data and the learning rate before "
                    "it diverges.")
        self._check_scale(record)

    def _check_headroom(self, name: str, layer: dict[str, Any], step: int) -> None:
        value = layer["act_amax"]
        if value >= FP16_MAX / self.headroom:
            self._warn_once(
                "fp16-headroom",
                f"at step {step} layer {name!r} produced |activations| up to {value:.4g}, "
                f"within {FP16_MAX / max(value, 1e-30):.1f}x of fp16's largest value (65504): "
                "it is about to overflow; keep it in higher precision or use a bf16 mode.")
            return
        past = [r["layers"][name]["act_amax"] for r in list(self.records)[-3:]
                if name in r["layers"]]
        if len(past) == 3 and past[0] > 0 and past[-1] > past[0]:
            growth = (past[-1] / past[0]) ** 0.5  # per record
            if growth > 1.2 and past[-1] * growth**10 >= FP16_MAX:
                records = math.log(FP16_MAX / past[-1]) / math.log(growth)
                self._warn_once(
                    "fp16-headroom",
                    f"the |activations| of layer {name!r} grow {growth:.2f}x every "
                    f"{self.every} steps (now {past[-1]:.4g}): at this rate they pass fp16's "
                    f"65504 around step {step + int(records * self.every)}.")

    def _check_scale(self, record: Record) -> None:
        scale, allowed = record["loss_scale"], record["scale_allowed"]
        if scale is None or allowed is None:
            return
        previous = self.records[-2] if len(self.records) > 1 else None
        if previous is None or previous["loss_scale"] is None or \
                previous["scale_allowed"] is None:
            return
        if allowed > self.scale_gap * scale and \
                previous["scale_allowed"] > self.scale_gap * previous["loss_scale"]:
            self._warn_once(
                "scale-stuck",
                f"the loss scale is {scale:g} at step {record['step']}, {allowed / scale:.0f}x "
                f"below what the gradients allow (about {allowed:.3g}), for two records: small "
                "gradients underflow in fp16. It grows back only every growth_interval clean "
                "steps; lower growth_interval or raise min_scale.")


def _layer_of(param_name: str) -> str:
    return param_name.rpartition(".")[0] or param_name


def _norm(tensors: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return math.sqrt(sum(float(t.float().square().sum()) for t in tensors))


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
