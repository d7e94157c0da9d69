"""Dynamic loss scaling.

Semantics follow torch's ``GradScaler`` (multiply the loss by ``scale``; before
the step divide gradients by it; on inf/NaN skip the step and back off; after
``growth_interval`` clean steps grow), plus what DeepSpeed users rely on and
torch lacks: a floor and a ceiling for the scale and hysteresis (back off only
after ``hysteresis`` overflows in a row).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._tensors import local_tensor, local_tensors
from .exceptions import CheckpointError, ModeOptionError

__all__ = ["LossScaler", "ScalerConfig", "grad_is_finite", "non_finite_found", "unscale_and_check",
           "unscale_fp16_wide"]


def _number(value: Any, name: str, *, integer: bool = False) -> float:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and int(value) != value):
        raise ModeOptionError(f"Invalid loss-scaler option: {name} must be {kind}, got {value!r}.")
    return float(value)


@dataclasses.dataclass(frozen=True)
class ScalerConfig:
    """The options of dynamic loss scaling: the one place they are spelled out.

    Modes that scale take these as keyword options (``init_scale=1024``), the
    registry checks option names against these fields, and :class:`LossScaler`
    is built from one. A new option is one field here (with its check in
    :meth:`__post_init__`).

    :param init_scale: scale of the first step (``2**16``).
    :param growth_factor: factor applied after ``growth_interval`` clean steps.
    :param backoff_factor: factor applied on an overflow (after hysteresis).
    :param growth_interval: clean steps between growths.
    :param min_scale: the scale never drops below this.
    :param max_scale: the scale never grows above this.
    :param hysteresis: overflows in a row tolerated before backing off (1 = torch).
    :param recover_after: after this many skipped steps in a row, the first clean step
        puts the scale back to the last value that trained cleanly, so a streak of bad
        batches (every scale fails on NaN data) cannot leave the scale collapsed at
        ``min_scale`` for tens of thousands of steps; 0: never (torch's behaviour).

    .. versionadded:: 0.2
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float = 1.0 / 2**24
    max_scale: float = 2.0**24
    hysteresis: int = 1
    recover_after: int = 8

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            integer = f.type in ("int", int)
            value = _number(getattr(self, f.name), f.name, integer=integer)
            object.__setattr__(self, f.name, int(value) if integer else value)
        checks = [
            (self.init_scale > 0 and math.isfinite(self.init_scale),
             "init_scale must be a positive number"),
            (self.growth_factor >= 1.0 and math.isfinite(self.growth_factor),
             "growth_factor must be >= 1"),
            (0.0 < self.backoff_factor < 1.0, "backoff_factor must be in (0, 1)"),
            (self.growth_interval >= 1, "growth_interval must be a positive integer"),
            (0.0 < self.min_scale <= self.max_scale and math.isfinite(self.max_scale),
             "min_scale must be positive and <= max_scale"),
            (self.hysteresis >= 1, "hysteresis must be an integer >= 1"),
            (self.recover_after >= 0, "recover_after must be an integer >= 0"),
        ]
        for ok, what in checks:
            if not ok:
                raise ModeOptionError(f"Invalid loss-scaler option: {what}.")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def resumable_options(cls) -> tuple[str, ...]:
        """Options that may change when a checkpoint is resumed (the new values apply
        from then on); the others must match the checkpoint's."""
        return tuple(name for name in cls.option_names() if name != "init_scale")

    def as_dict(self) -> dict[str, Any]:
        """Every option as a plain value."""
        return dataclasses.asdict(self)


class LossScaler:
    """Dynamic loss scale with torch ``GradScaler`` defaults.

    :param options: the fields of :class:`ScalerConfig` (``init_scale``,
        ``growth_factor``, ``backoff_factor``, ``growth_interval``, ``min_scale``,
        ``max_scale``, ``hysteresis``), or ``config=`` a whole one.
    """

    def __init__(self, config: ScalerConfig | None = None, **options: Any) -> None:
        if config is None:
            unknown = sorted(set(options) - set(ScalerConfig.option_names()))
            if unknown:
                raise ModeOptionError(
                    f"Unknown loss-scaler option {unknown[0]!r}; the options are "
                    f"{', '.join(ScalerConfig.option_names())}."
                )
            config = ScalerConfig(**options)
        elif options:
            raise ModeOptionError("Pass loss-scaler options either as config= or as keywords.")
        for key, value in config.as_dict().items():
            setattr(self, key, value)
        self.scale = min(max(float(config.init_scale), self.min_scale), self.max_scale)
        self._growth_tracker = 0
        self._hysteresis_left = self.hysteresis
        self._skips_in_a_row = 0
        #: the scale of the last step that was not skipped
        self.healthy_scale = self.scale
        self._recover_to = self.scale

    growth_factor: float
    backoff_factor: float
    growth_interval: int
    min_scale: float
    max_scale: float
    hysteresis: int
    recover_after: int

    def config(self) -> dict[str, Any]:
        """The options besides ``init_scale``, as plain values."""
        return {k: getattr(self, k) for k in ScalerConfig.option_names() if k != "init_scale"}

    def update(self, found_inf: bool) -> None:
        """Advance the scale after a step that did (or did not) overflow."""
        if found_inf:
            if self._skips_in_a_row == 0:
                self._recover_to = self.healthy_scale
            self._skips_in_a_row += 1
            self._growth_tracker = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
                self._hysteresis_left = self.hysteresis
            return
        used, self.healthy_scale = self.scale, self.scale
        if (self.recover_after and self._skips_in_a_row >= self.recover_after
                and self._recover_to > used):
            # A long streak ended by a clean step: bad batches, not a too-high scale (had
            # the scale been too high, the old value fails again and backs off for good,
            # since healthy_scale is now the low one).
            self.scale = self._recover_to
            self._growth_tracker = 0
        self._recover_to = used
        self._skips_in_a_row = 0
        self._hysteresis_left = self.hysteresis
        self._growth_tracker += 1
        if self._growth_tracker >= self.growth_interval:
            self.scale = min(self.scale * self.growth_factor, self.max_scale)
            self._growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly."""
        return {
            "scale": self.scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_left": self._hysteresis_left,
            "skips_in_a_row": self._skips_in_a_row,
            "healthy_scale": self.healthy_scale,
            "recover_to": self._recover_to,
            **self.config(),
        }

    def resume(self, state: Mapping[str, Any]) -> None:
        """Restore the scale and its counters from a :meth:`state_dict`, keeping this
        scaler's own options (those of the run that resumes)."""
        self.load_state_dict({**state, **self.config()})
        self._hysteresis_left = min(self._hysteresis_left, self.hysteresis)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the options saved in it included)."""
        try:
            self.scale = float(state["scale"])
            self._growth_tracker = int(state["growth_tracker"])
            self._hysteresis_left = int(state["hysteresis_left"])
            self._skips_in_a_row = int(state.get("skips_in_a_row", 0))
            self.healthy_scale = float(state.get("healthy_scale", self.scale))
            self._recover_to = float(state.get("recover_to", self.healthy_scale))
            for key in self.config():
                if key in state:
                    setattr(self, key, type(getattr(self, key))(state[key]))
        except KeyError as exc:
            raise CheckpointError(
                f"Loss-scaler state is missing {exc.args[0]!r}; "
                "pass the state saved by opt.state_dict() or wrapper.state_dict()."
            ) from None


@torch.no_grad()
def _values(grad: torch.Tensor) -> torch.Tensor:
    """The dense real tensor holding ``grad``'s values, sharing its storage so that
    in-place changes reach the gradient: a sparse gradient's values (what torch's
    ``GradScaler`` unscales), a complex gradient's real view (``view_as_real``)."""
    if grad.is_sparse:
        if grad.dtype is torch.float16 and not grad.is_coalesced():
            # As GradScaler: duplicate entries are summed later, and a scaled fp16 sum can
            # overflow; coalesce now (in place: the gradient stays the same object).
            grad.copy_(grad.coalesce())
        grad = grad._values()
    if grad.is_complex():
        grad = torch.view_as_real(grad)
    return grad


def grad_is_finite(grad: torch.Tensor) -> bool:
    """True if ``grad`` (dense or sparse, real or complex, a DTensor shard) holds no inf/NaN."""
    return bool(torch.isfinite(_values(local_tensor(grad))).all())


def _grouped(grads: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in local_tensors(grads):  # FSDP2: check and unscale this rank's shards in place
        v = _values(g)
        groups.setdefault((v.device, v.dtype), []).append(v)
    return groups


def unscale_fp16_wide(grads: Sequence[torch.Tensor], scale: float) -> tuple[bool, list[torch.Tensor]]:
    """Unscale dense fp16 ``grads`` in fp32: return (any inf/NaN, the fp32 unscaled
    gradients); each fp16 gradient gets its rounded value in place, for readers.

    A true gradient below fp16's smallest subnormal (6e-8) survives in the fp32 copy,
    which a mode stepping in fp32 uses (torch's ``GradScaler`` refuses to unscale fp16
    gradients for this reason).
    """
    wide = [g.float() for g in grads]
    found = unscale_and_check(wide, scale) if wide else False
    if wide:
        torch._foreach_copy_(list(grads), wide)
    return found, wide


def unscale_and_check(grads: Sequence[torch.Tensor], scale: float) -> bool:
    """Divide ``grads`` by ``scale`` in place; return True if any is inf/NaN.

    Sparse gradients are unscaled through their values (fp16 ones coalesced first, as
    torch's ``GradScaler`` does), complex ones through their real view.
    """
    flags = []
    for (device, _), group in _grouped(grads).items():
        found = torch.zeros(1, dtype=torch.float32, device=device)
        inv = torch.full((1,), 1.0 / scale, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv)
        flags.append(found)
    if not flags:
        return False
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).sum().item())


def non_finite_found(grads: Sequence[torch.Tensor]) -> bool:
    """True if any gradient holds inf/NaN (one read of each gradient, one sync).

    Sums propagate inf and NaN and are the cheapest full read on CPU (an
    inf-norm through ``torch._foreach_norm`` is ~50x slower there). A sum can
    only overflow for gradients near the dtype's maximum, which are worth
    skipping anyway; fp16 is summed in fp32 so large but finite fp16
    gradients are not mistaken for overflows (bf16 has fp32's range).
    """
    for (_, dtype), group in _grouped(grads).items():
        acc = torch.float32 if dtype is torch.float16 else None  # fp16 sums overflow early
        if not bool(torch.isfinite(torch.stack([g.sum(dtype=acc) for g in group])).all()):
            return True
    return False
