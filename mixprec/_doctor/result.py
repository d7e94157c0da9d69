"""What the doctor found, as plain data: per layer, per mode, and its recommendation.

Rendered by ``report`` (table, JSON, plot); :meth:`DoctorReport.to_json` gives every
number as plain values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .measure import OUTPUT

__all__ = ["Candidate", "DoctorReport", "Flag", "LayerResult", "ModeResult", "Recommendation"]


@dataclass(frozen=True)
class Candidate:
    """A mode to examine: a mode string and the options of its precision mode.

    :param mode: the mode string given to ``wrap`` (``"bf16-true"``, ``"32-true+adamw8bit"``).
    :param options: keyword options for the precision mode (``master_weights=True``).
    :param fix_of: the label of the mode this one fixes (a variant the doctor added).
    """

    mode: str
    options: tuple[tuple[str, Any], ...] = ()
    fix_of: str | None = None

    @property
    def label(self) -> str:
        if not self.options:
            return self.mode
        first, plus, rest = self.mode.partition("+")
        opts = ",".join(f"{k}={_show(v)}" for k, v in self.options)
        return f"{first}[{opts}]{plus}{rest}"

    def wrap_line(self) -> str:
        """The ``mixprec.wrap`` call that runs this mode."""
        opts = "".join(f", {k}={v!r}" for k, v in self.options)
        return f"model, opt = mixprec.wrap(model, opt, {self.mode!r}{opts})"

    def with_options(self, fix_of: str, **options: Any) -> Candidate:
        merged = dict(self.options)
        merged.update(options)
        return Candidate(self.mode, tuple(sorted(merged.items())), fix_of)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


@dataclass
class LayerResult:
    """One layer under one mode (None: not measured, e.g. a frozen layer's gradient).

    :param out_db: SQNR of the layer's output against the fp32 layer on the same input.
    :param impact_db: SQNR of the model output when only this layer runs in the mode.
    :param impact_pct: the loss change (%) when only this layer runs in the mode.
    :param grad_db: SQNR of the layer's weight gradient against the fp32 model's.
    :param fp16: the layer computes in fp16 in this mode (its output is fp16).
    :param act_amax: the largest |output| of the fp32 layer; ``grad_amax`` likewise
        for its output and weight gradients.
    :param underflow: fp16 layers: the share of nonzero gradient elements fp16 flushes
        to zero at the mode's loss scale.
    :param overflow: fp16 layers: the output exceeds fp16's range (65504) or goes
        non-finite where the fp32 layer's does not.
    :param lost: the share of updates lost to rounding, of the layer's worst-hit parameter.
    """

    name: str
    kind: str
    params: int
    out_db: float | None = None
    impact_db: float | None = None
    impact_pct: float | None = None
    grad_db: float | None = None
    dtype: str | None = None
    fp16: bool = False
    act_amax: float = 0.0
    grad_amax: float = 0.0
    underflow: float | None = None
    overflow: bool = False
    lost: float | None = None


@dataclass
class Flag:
    """A problem the doctor found in one mode.

    :param cause: ``fp16-overflow``, ``lost-updates``, ``sensitive``, ``non-finite``,
        ``skipped-steps`` or ``loss-gap``.
    :param layers: the layers it concerns (none for the whole mode).
    :param message: one sentence for the user.
    :param blocking: the mode is not recommended as it is because of it.
    """

    cause: str
    layers: list[str]
    message: str
    blocking: bool = True


@dataclass
class ModeResult:
    """Everything measured for one mode."""

    candidate: Candidate
    status: str = "ok"
    error: str | None = None
    layers: list[LayerResult] = field(default_factory=list)
    output_db: float | None = None
    loss_scale: float | None = None
    final_loss: float | None = None
    gap_pct: float | None = None
    step_ms: float | None = None
    bytes_per_param: float | None = None
    weight_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    skipped_steps: int = 0
    lost: float | None = None
    losses: list[float] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)
    takes: tuple[str, ...] = ()
    ignore_modules: tuple[str, ...] = ()
    summary: str = ""
    #: the mode's own warnings while the doctor wrapped and trained it (once each)
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.candidate.label

    @property
    def blocked(self) -> bool:
        return any(f.blocking for f in self.flags)

    def layer(self, name: str) -> LayerResult | None:
        return next((lr for lr in self.layers if lr.name == name), None)

    def ranked(self) -> list[LayerResult]:
        """Layers (not the model output) from the most sensitive (lowest impact SQNR) down."""
        def key(lr: LayerResult) -> float:
            return math.inf if lr.impact_db is None or math.isnan(lr.impact_db) else lr.impact_db
        return sorted((lr for lr in self.layers if lr.name != OUTPUT), key=key)


@dataclass
class Recommendation:
    """The mode to use, the layers to keep in high precision, and why."""

    candidate: Candidate | None
    reasons: list[str]
    ignore_modules: tuple[str, ...] = ()
    verdicts: dict[str, str] = field(default_factory=dict)

    @property
    def wrap_line(self) -> str | None:
        return None if self.candidate is None else self.candidate.wrap_line()


@dataclass
class DoctorReport:
    """The doctor's findings; ``print(report)`` shows the table."""

    model: str
    params: int
    device: str
    measure_batches: int
    train_batches: int
    steps: int
    loss_threshold: float
    sqnr_threshold: float
    lost_threshold: float
    baseline_loss: float | None
    modes: list[ModeResult]
    left_out: list[tuple[str, str]]
    recommendation: Recommendation

    def mode(self, label: str) -> ModeResult:
        """The result of the mode labelled ``label`` (``"bf16-true[master_weights=True]"``)."""
        for m in self.modes:
            if m.label == label:
                return m
        raise KeyError(f"{label!r} was not examined; examined: {[m.label for m in self.modes]}")

    def to_json(self) -> dict[str, Any]:
        """Every number as plain values (infinities as ``"inf"``/``"-inf"``, NaN as None)."""
        return _plain(dataclasses.asdict(self) | {
            "recommendation": {
                "mode": None if self.recommendation.candidate is None
                else self.recommendation.candidate.label,
                "wrap": self.recommendation.wrap_line,
                "ignore_modules": list(self.recommendation.ignore_modules),
                "reasons": self.recommendation.reasons,
                "verdicts": self.recommendation.verdicts,
            },
            "modes": [_plain(dataclasses.asdict(m)) | {"label": m.label} for m in self.modes],
            "left_out": [{"mode": m, "reason": r} for m, r in self.left_out],
        })

    def __str__(self) -> str:
        from .report import plain_report

        return plain_report(self)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"  # an SQNR of inf: identical to fp32
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
