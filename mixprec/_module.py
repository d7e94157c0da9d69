"""The module ``wrap`` returns: the user's module run under the mode."""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from .exceptions import AlreadyWrappedError

if TYPE_CHECKING:
    from ._interface import PrecisionMode
    from ._wrapper import PrecisionWrapper

__all__ = ["WrappedModule", "check_not_wrapped", "is_wrapped"]

#: Inner modules currently wrapped (weak: a deleted model leaves the set).
_WRAPPED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def is_wrapped(module: torch.nn.Module) -> bool:
    """True if ``module`` is a wrapped module or the inside of one."""
    return isinstance(module, WrappedModule) or module in _WRAPPED


class WrappedModule(torch.nn.Module):
    """Runs the inner module's forward under the precision mode.

    Behaves as the inner module does: attribute access falls through to it, and
    ``parameters()``, ``named_parameters()``, ``modules()``, ``state_dict()`` and
    ``load_state_dict()`` use the inner module's names (no ``_module.`` prefix).
    The state dict holds fp32 master values where the mode keeps them.
    """

    _module: torch.nn.Module

    def __init__(self, module: torch.nn.Module, precision: PrecisionWrapper) -> None:
        super().__init__()
        self._module = module
        self._mode: PrecisionMode = precision.precision_mode
        self._precision: PrecisionWrapper | None = precision
        # FSDP2 plans of mixed modes cast through MixedPrecisionPolicy: no second autocast
        plan = precision.fsdp_plan
        self._forward_context = plan is None or plan.forward_context
        # Nested in another module (peft's PeftModel), torch loads our part of a state
        # dict through its own recursion, which expects the ``_module.`` prefix that our
        # state_dict() never writes: route the keys to the inner module.
        self.register_load_state_dict_pre_hook(_route_keys_to_inner)
        _WRAPPED.add(module)

    @property
    def module(self) -> torch.nn.Module:
        """The inner (user's) module."""
        return self._modules["_module"]  # type: ignore[return-value]

    @property
    def precision(self) -> PrecisionWrapper:
        """The :class:`PrecisionWrapper` shared with the wrapped optimizer."""
        if self._precision is None:  # a copy (deepcopy/pickle) gets its own, with no optimizer
            from ._wrapper import PrecisionWrapper

            self._precision = PrecisionWrapper._for_copy(self)
        return self._precision

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        mode = self._mode
        if self._precision is not None:  # DDP: will this forward's backward all-reduce?
            self._precision._dist.note_forward()
        args, kwargs = mode.convert_input((args, kwargs))
        with mode.forward_context() if self._forward_context else contextlib.nullcontext():
            output = self.module(*args, **kwargs)
        return mode.convert_output(output)

    def __setattr__(self, name: str, value: Any) -> None:
        # A module assigned over one of the inner module's children (peft swapping
        # ``lm_head`` for a LoRA layer) belongs to the inner module.
        modules = self.__dict__.get("_modules")
        if (isinstance(value, torch.nn.Module) and modules and "_module" in modules
                and name in modules["_module"]._modules):
            setattr(modules["_module"], name, value)
            return
        super().__setattr__(name, value)

    def __getitem__(self, index: Any) -> Any:
        return self.module[index]  # type: ignore[index]

    def __len__(self) -> int:
        return len(self.module)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.module)  # type: ignore[call-overload]

    def __bool__(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "_module" not in modules:
                raise
            attr = getattr(modules["_module"], name)
            if name == "save_pretrained" and callable(attr):
                return self._saving_state_dict(attr)
            return attr

    def _saving_state_dict(self, save: Any) -> Any:
        """``save_pretrained`` (transformers, peft) reads the inner module's own state
        dict: give it ours, so that it writes what ``state_dict()`` holds (the fp32
        masters where the mode keeps them), not the low-precision copies."""
        precision = self._precision
        if precision is None or precision.masters is None:
            return save

        @functools.wraps(save)
        def save_pretrained(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("state_dict") is None:
                kwargs["state_dict"] = self.state_dict()
            return save(*args, **kwargs)

        return save_pretrained

    # -- the inner module's names --------------------------------------------

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self.module.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        return self.module.named_buffers(prefix, recurse, remove_duplicate)

    def named_modules(
        self, memo: set[torch.nn.Module] | None = None, prefix: str = "",
        remove_duplicate: bool = True,
    ) -> Iterator[tuple[str, torch.nn.Module]]:
        return self.module.named_modules(memo, prefix, remove_duplicate)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.precision._module_state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        return self.precision._load_module_state_dict(state_dict, strict=strict, assign=assign)

    # -- copies --------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_precision"] = None  # the optimizer link does not travel with a copy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _WRAPPED.add(self.module)

    def __repr__(self) -> str:
        return f"WrappedModule(mode={self._mode.describe()}, module={self.module!r})"


def _route_keys_to_inner(
    module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    inner = prefix + "_module."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


def check_not_wrapped(model: torch.nn.Module) -> None:
    """Raise :class:`AlreadyWrappedError` if ``model`` or a part of it belongs to a model
    wrapped now: the model itself, a module inside it (a parent of a wrapped model), or
    a parameter of a wrapped model (a child of one, a module sharing its parameters).
    Wrapping it would convert that model's parameters under it.

    Found from the wrapped models' current parameters, so parameters swapped in after
    ``wrap`` count too, and an unwrapped model's do not.
    """
    if is_wrapped(model):
        raise AlreadyWrappedError(
            "This model is already wrapped by mixprec; call mixprec.unwrap(model) first "
            "to wrap it in another mode."
        )
    for name, sub in model.named_modules():
        if sub is not model and is_wrapped(sub):
            raise AlreadyWrappedError(
                f"Module {name!r} inside this model is wrapped by mixprec already; wrap the "
                "whole model once, after mixprec.unwrap() of that part."
            )
    owners = {id(p): (inner, n) for inner in list(_WRAPPED)
              for n, p in inner.named_parameters(remove_duplicate=False)}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owners:
            inner, theirs = owners[id(p)]
            raise AlreadyWrappedError(
                f"Parameter {name!r} of this model is {theirs!r} of a "
                f"{type(inner).__name__} wrapped by mixprec now, whose weights a second wrap "
                "would convert under it; wrap the whole model once, or call mixprec.unwrap() "
                "on the wrapped one first."
            )
