"""The checkpoint format: what ``state_dict()`` of a wrapped pair holds besides
the model and optimizer state, its version, and the mode check on load.

A checkpoint is ``{"model": …, "optimizer": {…, "mixprec": PRECISION}}``, or
``{"model": …, "mixprec": PRECISION}`` without an optimizer (and for sharded
FSDP2 checkpoints). ``PRECISION`` holds plain values only, so checkpoints load
with ``torch.load(..., weights_only=True)``::

    {"format": 1, "mode": "16-mixed", "options": {...}, "scaler": {...} | None,
     "steps": int, "skipped_steps": int, "mode_state": {...}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .exceptions import CheckpointError

__all__ = ["FORMAT", "KEY", "check_mode", "find_precision_state", "precision_state",
           "split_optimizer_state"]

#: version of the format written
FORMAT = 1
#: where the precision state sits in an optimizer's (or a whole) state dict
KEY = "mixprec"


def precision_state(
    *, mode: str, options: Mapping[str, Any], scaler: Mapping[str, Any] | None, steps: int,
    skipped_steps: int, mode_state: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``"mixprec"`` entry of a checkpoint."""
    return {
        "format": FORMAT,
        "mode": mode,
        "options": dict(options),
        "scaler": None if scaler is None else dict(scaler),
        "steps": steps,
        "skipped_steps": skipped_steps,
        "mode_state": dict(mode_state),
    }


def split_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """An optimizer state dict without its ``"mixprec"`` entry, and that entry (or None)."""
    inner = dict(state)
    return inner, inner.pop(KEY, None)


def find_precision_state(checkpoint: Mapping[str, Any]) -> Any:
    """The ``"mixprec"`` entry of a whole checkpoint, wherever it sits (or None)."""
    optimizer = checkpoint.get("optimizer")
    if isinstance(optimizer, Mapping) and KEY in optimizer:
        return optimizer[KEY]
    return checkpoint.get(KEY)


def check_mode(state: Mapping[str, Any], mode_name: str) -> None:
    """Raise :class:`CheckpointError` if ``state`` was saved in another mode."""
    mode = state.get("mode")
    if mode != mode_name:
        raise CheckpointError(
            f"The checkpoint was saved in mode {mode!r} but this wrapper runs "
            f"{mode_name!r}; wrap with mode={mode!r} to resume it, or load only the "
            "model weights with model.load_state_dict()."
        )
