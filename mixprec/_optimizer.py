"""The optimizer ``wrap`` returns: the user's optimizer, stepped through the wrapper."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ._wrapper import PrecisionWrapper

__all__ = ["WrappedOptimizer"]


class WrappedOptimizer(torch.optim.Optimizer):
    """A :class:`torch.optim.Optimizer` that backs, steps and checkpoints through the
    :class:`PrecisionWrapper`.

    ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's, so LR
    schedulers attach to it and changing a group's ``lr`` takes effect. In a
    master-weight mode the groups hold the fp32 masters.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, precision: PrecisionWrapper) -> None:
        # Deliberately no super().__init__: every piece of state is the inner optimizer's.
        self.__dict__["optimizer"] = optimizer
        self.__dict__["precision"] = precision

    optimizer: torch.optim.Optimizer
    precision: PrecisionWrapper

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str) -> Any:
        if name in ("optimizer", "precision"):
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name)

    # -- training --------------------------------------------------------------

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """``loss.backward()`` with loss scaling where the mode needs it."""
        self.precision.backward(loss, *args, **kwargs)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Unscale, skip on inf/NaN, step, update the scale. Returns the closure's
        result, or None when the step was skipped."""
        return self.precision.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.precision.zero_grad(set_to_none)

    def unscale_(self) -> None:
        """Unscale gradients now (once per step), e.g. before inspecting or clipping them.

        Afterwards the true gradients are on ``model.parameters()`` in every mode (in
        master-weight modes as copies of the fp32 masters' gradients, in the model's
        dtype); what torch utilities write into them there is used by ``step()``.
        """
        self.precision.unscale_(expose=True)

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> torch.Tensor:
        """Clip the true (unscaled) gradients' norm; returns the norm before clipping."""
        return self.precision.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite, foreach)

    def clip_grad_value_(self, clip_value: float, foreach: bool | None = None) -> None:
        """Clip the true (unscaled) gradients' values."""
        self.precision.unscale_()
        torch.nn.utils.clip_grad_value_(self.precision.step_parameters(), clip_value,
                                        foreach=foreach)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.precision.add_param_group(param_group)

    # -- checkpoints -----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"mixprec"`` entry (mode, scaler)."""
        return self.precision._optimizer_state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.precision._load_optimizer_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"WrappedOptimizer(mode={self.precision.mode_name}, optimizer={self.optimizer!r})"
