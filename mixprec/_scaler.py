"""Dynamic loss scaling.

Semantics follow torch's ``GradScaler`` (multiply the loss by ``scale``; before
the step divide gradients by it; on inf/NaN skip the step and back off; after
``growth_interval`` clean steps grow), plus what DeepSpeed users rely on and
torch lacks: a floor and a ceiling for the scale and hysteresis (back off only
after ``hysteresis`` overflows in a row).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._tensors import local_tensors
from .exceptions import CheckpointError, ModeOptionError

__all__ = ["LossScaler", "non_finite_found", "unscale_and_check"]


class LossScaler:
    """Dynamic loss scale with torch ``GradScaler`` defaults.

    :param init_scale: scale of the first step (``2**16``).
    :param growth_factor: factor applied after ``growth_interval`` clean steps.
    :param backoff_factor: factor applied on an overflow (after hysteresis).
    :param growth_interval: clean steps between growths.
    :param min_scale: the scale never drops below this.
    :param max_scale: the scale never grows above this.
    :param hysteresis: overflows in a row tolerated before backing off (1 = torch).
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float = 1.0 / 2**24,
        max_scale: float = 2.0**24,
        hysteresis: int = 1,
    ) -> None:
        checks = [
            (init_scale > 0 and math.isfinite(init_scale), "init_scale must be a positive number"),
            (growth_factor >= 1.0, "growth_factor must be >= 1"),
            (0.0 < backoff_factor < 1.0, "backoff_factor must be in (0, 1)"),
            (int(growth_interval) == growth_interval and growth_interval >= 1,
             "growth_interval must be a positive integer"),
            (0.0 < min_scale <= max_scale, "min_scale must be positive and <= max_scale"),
            (int(hysteresis) == hysteresis and hysteresis >= 1, "hysteresis must be an integer >= 1"),
        ]
        for ok, what in checks:
            if not ok:
                raise ModeOptionError(f"Invalid loss-scaler option: {what}.")
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.hysteresis = int(hysteresis)
        self.scale = min(max(float(init_scale), self.min_scale), self.max_scale)
        self._growth_tracker = 0
        self._hysteresis_left = self.hysteresis

    def config(self) -> dict[str, Any]:
        """The constructor options, as plain values."""
        return {
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "hysteresis": self.hysteresis,
        }

    def update(self, found_inf: bool) -> None:
        """Advance the scale after a step that did (or did not) overflow."""
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
                self._hysteresis_left = self.hysteresis
            return
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
            **self.config(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        try:
            self.scale = float(state["scale"])
            self._growth_tracker = int(state["growth_tracker"])
            self._hysteresis_left = int(state["hysteresis_left"])
            for key in self.config():
                if key in state:
                    setattr(self, key, type(getattr(self, key))(state[key]))
        except KeyError as exc:
            raise CheckpointError(
                f"Loss-scaler state is missing {exc.args[0]!r}; "
                "pass the state saved by opt.state_dict() or wrapper.state_dict()."
            ) from None


def _grouped(grads: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in local_tensors(grads):  # FSDP2: check and unscale this rank's shards in place
        groups.setdefault((g.device, g.dtype), []).append(g)
    return groups


def unscale_and_check(grads: Sequence[torch.Tensor], scale: float) -> bool:
    """Divide ``grads`` by ``scale`` in place; return True if any is inf/NaN."""
    flags = []
    for (device, _), group in _grouped(grads).items():
        found = torch.zeros(1, device=device)
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
