"""The doctor's short training run: one mode, the same data and initial weights as fp32.

The run is an ordinary mixprec loop (``opt.backward``, clipping, ``opt.step``,
``opt.zero_grad``) on a copy the mode converted. An observer on the wrapper's
step seam (:class:`~mixprec.StepHooks`) counts, over the last steps, the updates
each layer lost to rounding (:class:`~mixprec._doctor.sqnr.LostUpdates`). Bytes per
parameter are counted from the tensors, as ``mixprec bench`` counts them.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .sqnr import LostUpdates

if TYPE_CHECKING:
    from .._module import WrappedModule
    from .._optimizer import WrappedOptimizer
    from .._wrapper import PrecisionWrapper

__all__ = ["LostUpdateRecorder", "TrainResult", "layer_of", "train_run"]

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def layer_of(param_name: str) -> str:
    """The module a parameter belongs to (``blocks.0.fc1.weight`` -> ``blocks.0.fc1``)."""
    return param_name.rpartition(".")[0] or param_name


class LostUpdateRecorder:
    """A :class:`~mixprec.StepHooks` observer counting lost updates per parameter
    (by its model name; fp32 masters count for their parameter) while ``active``."""

    def __init__(self) -> None:
        self.lost = LostUpdates()
        self.active = False

    def attach(self, wrapper: PrecisionWrapper) -> None:
        pass

    def before_step(self, wrapper: PrecisionWrapper) -> None:
        if self.active and not wrapper.step_will_be_skipped:
            self.lost.before([(wrapper.param_name(p), p) for p in wrapper.step_parameters()])

    def after_step(self, wrapper: PrecisionWrapper, skipped: bool) -> None:
        if self.active:
            self.lost.after(taken=not skipped)

    def layer_share(self, layer: str) -> float | None:
        """The share of lost updates of the layer's worst-hit parameter (None: none counted)."""
        shares = [self.lost.share(n) for n in self.lost.counts if layer_of(n) == layer]
        return max((s for s in shares if s is not None), default=None)


@dataclass
class TrainResult:
    """What the short run of one mode gave."""

    losses: list[float] = field(default_factory=list)
    final_loss: float = math.nan
    step_ms: float | None = None
    skipped_steps: int = 0
    params: int = 0
    weight_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0

    @property
    def bytes_per_param(self) -> float:
        """Weights, gradients and optimizer state (fp32 masters included) per parameter."""
        total = self.weight_bytes + self.grad_bytes + self.optimizer_bytes
        return total / self.params if self.params else math.nan


def train_run(
    model: WrappedModule, opt: WrappedOptimizer, recorder: LostUpdateRecorder,
    batches: Sequence[Any], loss_fn: LossFn, *, steps: int, clip: float | None,
    lost_steps: int, params: int, advance: Callable[[int], None] = lambda n: None,
) -> TrainResult:
    """Train ``steps`` steps cycling through ``batches``; the loss after it is the mean
    over ``batches`` (no gradient). Lost updates are counted over the last
    ``lost_steps`` steps."""
    # counted as mixprec bench counts (imported here: the bench package is a command)
    from .._bench.memory import StorageCounter, module_tensors, optimizer_tensors

    result = TrainResult(params=params)
    precision = opt.precision
    times: list[float] = []
    warmup = min(2, steps - 1)
    for index in range(steps):
        recorder.active = index >= steps - lost_steps
        batch = batches[index % len(batches)]
        began = time.perf_counter()
        loss = loss_fn(model, batch)
        opt.backward(loss)
        if index == steps - 1:
            counter = StorageCounter()
            grads = [p.grad for p in model.module.parameters() if p.grad is not None]
            grads += [p.grad for p in precision.step_parameters() if p.grad is not None]
            result.grad_bytes = counter.add(grads)
        if clip:
            opt.clip_grad_norm_(clip)
        opt.step()
        opt.zero_grad()
        if index >= warmup:
            times.append((time.perf_counter() - began) * 1e3)
        result.losses.append(float(loss.detach()))
        advance(1)
    recorder.active = False
    result.step_ms = statistics.median(times) if times else None
    result.skipped_steps = precision.skipped_steps
    counter = StorageCounter()
    result.weight_bytes = counter.add(module_tensors(model.module))
    result.optimizer_bytes = counter.add(optimizer_tensors(opt.optimizer))
    result.optimizer_bytes += counter.add(precision.step_parameters())  # fp32 masters
    was_training = model.training
    model.eval()
    with torch.no_grad():
        finals = [float(loss_fn(model, b)) for b in batches]
    model.train(was_training)
    result.final_loss = sum(finals) / len(finals)
    return result
