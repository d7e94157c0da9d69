"""The checkpoint half of ``PrecisionWrapper``: its state dicts, validated whole and
applied all or nothing (the format itself is in ``_checkpoint.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import _checkpoint
from ._interface import PrecisionMode
from ._scaler import ScalerConfig
from .exceptions import CheckpointError, MixprecError

if TYPE_CHECKING:
    from ._master import MasterWeights
    from ._module import WrappedModule
    from ._optimizer import WrappedOptimizer
    from ._optimizers import OptimizerSet
    from ._scaler import LossScaler

__all__ = ["WrapperCheckpoints"]


class WrapperCheckpoints:
    """``PrecisionWrapper``'s checkpoint methods (a base class of it; not used alone)."""

    # set by PrecisionWrapper
    module: WrappedModule | None
    optimizer: WrappedOptimizer | None
    masters: MasterWeights | None
    scaler: LossScaler | None
    precision_mode: PrecisionMode
    mode_name: str
    steps: int
    skipped_steps: int
    _several: OptimizerSet | None

    def _module_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        assert self.module is not None
        inner = self.module.module
        state = inner.state_dict(*args, **kwargs)
        if self.masters is not None:
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
            keep_vars = kwargs.get("keep_vars", args[2] if len(args) > 2 else False)
            by_param = {id(m): mst for m, mst in self.masters.pairs}
            for name, p in inner.named_parameters(remove_duplicate=False):
                master = by_param.get(id(p))
                if master is not None and prefix + name in state:
                    state[prefix + name] = master if keep_vars else master.detach()
        return self.precision_mode.module_state_dict(inner, state)

    def _load_module_state_dict(self, state: Mapping[str, Any], strict: bool, assign: bool) -> Any:
        assert self.module is not None
        inner = self.module.module
        if assign:
            raise CheckpointError(
                "load_state_dict(assign=True) would replace the wrapped parameters; "
                "load with assign=False (the default)."
            )
        self._check_module_state(state, strict)
        result = self.precision_mode.load_module_state_dict(inner, state, strict)
        if self.masters is not None:
            self.masters.load_from(dict(inner.named_parameters(remove_duplicate=False)), state)
        return result

    def _check_module_state(self, state: Any, strict: bool) -> None:
        """Validate a model state dict before anything is loaded. A mode that loads its
        module state itself (``load_module_state_dict`` overridden: quantized or swapped
        layers) validates its own format there, before it changes anything."""
        assert self.module is not None
        mode = type(self.precision_mode)
        if mode.load_module_state_dict is not PrecisionMode.load_module_state_dict:
            return
        inner = self.module.module
        names = {n for n, _ in (*inner.named_parameters(remove_duplicate=False),
                                *inner.named_buffers(remove_duplicate=False))}
        _checkpoint.check_module_state(self._module_state_dict(), state, strict, names)

    def precision_state(self) -> dict[str, Any]:
        """The checkpoint's ``"mixprec"`` entry for this wrapper (see ``_checkpoint.py``)."""
        return _checkpoint.precision_state(
            mode=self.mode_name, options=self.precision_mode.options(),
            scaler=None if self.scaler is None else self.scaler.state_dict(),
            steps=self.steps, skipped_steps=self.skipped_steps,
            mode_state=self.precision_mode.state_dict(),
        )

    def check_precision_state(self, state: Any) -> None:
        """Raise :class:`CheckpointError` unless ``state`` can be loaded by
        :meth:`load_precision_state`: same mode and options (loss-scaler dynamics
        may differ: this wrapper's apply), valid scaler values, a known format."""
        _checkpoint.check_precision_state(
            state, mode_name=self.mode_name, options=self.precision_mode.options(),
            has_scaler=self.scaler is not None, resumable=ScalerConfig.resumable_options(),
        )
        saved = state.get("scaler") if self.scaler is not None else None
        if saved is not None:  # damaged options are a damaged checkpoint, even if unused
            try:
                ScalerConfig(**{k: saved[k] for k in ScalerConfig.option_names() if k in saved})
            except MixprecError as exc:
                raise CheckpointError(f"The checkpoint's loss-scaler state is damaged: {exc} "
                                      "Nothing was changed.") from None

    def load_precision_state(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`precision_state` saved in this mode (validated first)."""
        self.check_precision_state(state)
        self.precision_mode.load_state_dict(state.get("mode_state") or {})
        if self.scaler is not None:
            self.scaler.resume(state["scaler"])
        self.steps = int(state.get("steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def _optimizer_state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None
        return _checkpoint.optimizer_state(self.optimizer.optimizer.state_dict(),
                                           self.precision_state())

    def _load_optimizer_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self.optimizer is not None
        state, extra = _checkpoint.split_optimizer_state(state)
        inner = self.optimizer.optimizer
        if extra is not None:
            self.check_precision_state(extra)
        _checkpoint.check_optimizer_state(inner, state)
        with self.precision_mode.optimizer_step_context(inner):
            inner.load_state_dict(state)  # all or nothing in torch: validated first
        if extra is not None:
            self.load_precision_state(extra)

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume exactly: model (fp32 masters where they exist),
        optimizer, scaler, mode and options. Loads with ``weights_only=True``. With
        several optimizers: every optimizer's state and the shared scaler."""
        if self._several is not None:
            return self._several.state_dict()
        assert self.module is not None
        out: dict[str, Any] = {"model": self.module.state_dict()}
        if self.optimizer is not None:
            out["optimizer"] = self.optimizer.state_dict()
        else:
            out[_checkpoint.KEY] = self.precision_state()
        return out

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore a :meth:`state_dict` into this (freshly) wrapped pair.

        All or nothing: the whole checkpoint (mode, options, scaler values, model keys
        and shapes, optimizer groups and state shapes) is validated before anything
        changes; any problem is a :class:`CheckpointError` saying what and where.
        """
        if self._several is not None:
            self._several.load_state_dict(state, strict)
            return
        assert self.module is not None
        if not isinstance(state, Mapping) or "model" not in state:
            raise CheckpointError(
                "This is not a mixprec checkpoint (no 'model' entry); load model and optimizer "
                "state dicts separately with model.load_state_dict() / opt.load_state_dict()."
            )
        if self.optimizer is not None:
            _checkpoint.check_optimizer_count(state, 1)
        extra = _checkpoint.find_precision_state(state)
        if extra is not None:
            self.check_precision_state(extra)
        self._check_module_state(state["model"], strict)
        optim = None
        if self.optimizer is not None and "optimizer" in state:
            optim, _ = _checkpoint.split_optimizer_state(state["optimizer"])
            _checkpoint.check_optimizer_state(self.optimizer.optimizer, optim)
        # Validated: apply, the model last (torch's module load is not atomic itself).
        if optim is not None:
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state["optimizer"])
        elif extra is not None:
            self.load_precision_state(extra)
        self.module.load_state_dict(state["model"], strict=strict)
