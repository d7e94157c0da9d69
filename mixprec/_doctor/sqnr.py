"""The numbers the doctor and the monitor measure: SQNR, fp16 range, lost updates.

Every function here works on plain tensors, so that a test can compute the same
number directly on the same tensors and compare.

- SQNR (signal-to-quantization-noise ratio, dB) of a tensor ``test`` against a
  reference ``ref``: ``10 log10(sum(ref²) / sum((ref - test)²))``, in float64.
  Over several batches the powers are summed first (:class:`PowerSum`), so a
  quiet batch does not weigh like a loud one.
- fp16 range: the largest finite fp16 value is 65504; a value whose magnitude is
  at most 2**-25 (half the smallest subnormal) rounds to zero.
- a lost update: an element that had a gradient, and whose stored value did not
  change in the optimizer step. With round-to-nearest storage (every core mode)
  that is exactly an update smaller than half a unit in the last place of the
  weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._tensors import apply_to_float_tensors

__all__ = [
    "FP16_FLUSH",
    "FP16_MAX",
    "FP16_MIN_NORMAL",
    "LostUpdates",
    "PowerSum",
    "float_tensors",
    "sqnr_db",
    "underflow_counts",
]

#: the largest finite fp16 value
FP16_MAX = 65504.0
#: magnitudes up to this (half the smallest fp16 subnormal, 2**-25) round to zero in fp16
FP16_FLUSH = 2.0**-25
#: the smallest normal fp16 value: below it fp16 keeps fewer bits (subnormals)
FP16_MIN_NORMAL = 2.0**-14


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """SQNR of ``test`` against ``ref`` in dB (inf when equal; -inf or nan where
    ``test`` is not finite). Both are compared in float64."""
    power = PowerSum()
    power.add(ref, test)
    return power.db


@dataclass
class PowerSum:
    """Signal and noise power summed over several tensors (batches, outputs)."""

    signal: float = 0.0
    noise: float = 0.0
    nonfinite: int = 0

    def add(self, ref: torch.Tensor, test: torch.Tensor) -> None:
        """Add one pair of tensors of the same shape."""
        r = ref.detach().to(torch.float64)
        t = test.detach().to(torch.float64)
        if r.shape != t.shape:
            raise ValueError(f"cannot compare shapes {tuple(r.shape)} and {tuple(t.shape)}")
        finite = torch.isfinite(t)
        self.nonfinite += int((~finite).sum())
        self.signal += float(r.square().sum())
        self.noise += float((r - t).square().sum())

    @property
    def db(self) -> float:
        """The SQNR in dB; nan when ``test`` held inf/NaN."""
        if self.nonfinite:
            return math.nan
        return _db(self.signal, self.noise)


def float_tensors(data: Any) -> list[torch.Tensor]:
    """The floating-point tensors inside nested outputs (tuples, dicts, dataclasses,
    model-output objects), in order."""
    found: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        found.append(t)
        return t

    apply_to_float_tensors(data, keep)
    return found


def amax(tensors: Iterable[torch.Tensor]) -> float:
    """The largest magnitude in ``tensors`` (0 for none); inf/NaN count as inf."""
    out = 0.0
    for t in tensors:
        if t.numel():
            value = float(t.detach().abs().max())
            out = max(out, value if math.isfinite(value) else math.inf)
    return out


def underflow_counts(grads: Iterable[torch.Tensor], scale: float) -> tuple[int, int]:
    """``(flushed, nonzero)``: of the nonzero elements of ``grads`` (true, unscaled
    values), how many fp16 rounds to zero once multiplied by the loss ``scale``."""
    flushed = nonzero = 0
    for g in grads:
        mag = g.detach().abs().to(torch.float64)
        nz = mag > 0
        nonzero += int(nz.sum())
        flushed += int((nz & (mag * scale <= FP16_FLUSH)).sum())
    return flushed, nonzero


class LostUpdates:
    """Counts, per name, the elements whose update was lost in optimizer steps.

    ``before(named)`` snapshots the tensors the optimizer steps and which of their
    elements have a nonzero gradient; ``after()`` counts those elements whose value
    did not change. Call both around each step measured.
    """

    def __init__(self) -> None:
        #: name -> [lost elements, elements with a gradient]
        self.counts: dict[str, list[int]] = {}
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def before(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        self._pending = []
        for name, p in named:
            if p.grad is None or not p.is_floating_point():
                continue
            self._pending.append((name, p, p.detach().clone(), p.grad.detach() != 0))

    def after(self, taken: bool = True) -> dict[str, tuple[int, int]]:
        """Count the step just taken (a skipped step counts nothing); returns this
        step's counts by name."""
        step: dict[str, tuple[int, int]] = {}
        if taken:
            for name, p, old, moved in self._pending:
                same = (p.detach() == old) & moved
                lost, counted = int(same.sum()), int(moved.sum())
                prev = step.get(name, (0, 0))
                step[name] = (prev[0] + lost, prev[1] + counted)
        self._pending = []
        for name, (lost, counted) in step.items():
            entry = self.counts.setdefault(name, [0, 0])
            entry[0] += lost
            entry[1] += counted
        return step

    def share(self, name: str) -> float | None:
        """The share of lost updates of ``name`` so far (None: nothing counted)."""
        lost, counted = self.counts.get(name, (0, 0))
        return lost / counted if counted else None

    def total_share(self) -> float | None:
        lost = sum(c[0] for c in self.counts.values())
        counted = sum(c[1] for c in self.counts.values())
        return lost / counted if counted else None
