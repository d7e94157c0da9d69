"""The module ``wrap`` returns: the user's module run under the mode."""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ._tensors import compiled_module_class
from .exceptions import AlreadyWrappedError, WrapError

if TYPE_CHECKING:
    from ._interface import PrecisionMode
    from ._wrapper import PrecisionWrapper

__all__ = ["WrappedModule", "check_forward_methods", "check_not_wrapped", "is_wrapped",
           "split_compiled", "uncompiled"]

#: Inner modules currently wrapped (weak: a deleted model leaves the set).
_WRAPPED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``torch.compile``'s ``OptimizedModule`` (however many times
    compiled), else ``module`` itself."""
    cls = compiled_module_class()
    while cls is not None and isinstance(module, cls):
        module = module._orig_mod
    return module


def is_wrapped(module: torch.nn.Module) -> bool:
    """True if ``module`` is a wrapped module or the inside of one, also once compiled
    with ``torch.compile`` (``torch.compile(wrapped)``)."""
    module = uncompiled(module)
    return isinstance(module, WrappedModule) or module in _WRAPPED


def split_compiled(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """``(plain module, compiled module)`` for ``wrap(torch.compile(model))``, else
    ``(model, None)``.

    ``torch.compile(model)`` returns torch's ``OptimizedModule``, which holds the model
    as its child ``_orig_mod``: wrapped as it is, every parameter and state-dict key
    would be named ``_orig_mod.…``. ``wrap`` converts and wraps the plain module inside
    instead (names, keys and ``ignore_modules`` as in eager) and the wrapped forward
    calls the compiled one. A compiled *wrapped* module is left as it is (``wrap``
    refuses it).
    """
    inner = uncompiled(model)
    if inner is model or is_wrapped(inner):
        return model, None
    return inner, model


def check_forward_methods(model: torch.nn.Module, names: Iterable[str] | None) -> None:
    """Raise :class:`WrapError` unless every name is a method of ``model`` that
    :meth:`WrappedModule.mark_forward_method` can take (before ``wrap`` changes anything)."""
    for name in names or ():
        if not isinstance(name, str):
            raise WrapError(f"forward_methods takes method names (str), got {name!r}.")
        if name == "forward" or hasattr(WrappedModule, name):
            raise WrapError(
                f"{name!r} is a method of every wrapped module, which mixprec runs itself; "
                "name a method of your own model instead."
            )
        if not callable(getattr(model, name, None)):
            raise WrapError(
                f"The model has no method {name!r} to run under the mode; check the name "
                f"({type(model).__name__} has no such method)."
            )


class WrappedModule(torch.nn.Module):
    """Runs the inner module's forward under the precision mode.

    Behaves as the inner module does: attribute access falls through to it, and
    ``parameters()``, ``named_parameters()``, ``modules()``, ``state_dict()`` and
    ``load_state_dict()`` use the inner module's names (no ``_module.`` prefix).
    The state dict holds fp32 master values where the mode keeps them.

    Methods named in ``forward_methods`` (``generate`` by default, where the inner
    module has it) run under the mode as the forward does; see
    :meth:`mark_forward_method`.
    """

    _module: torch.nn.Module
    #: wrap(torch.compile(model)): the compiled module the forward calls, else None
    _compiled: torch.nn.Module | None

    def __init__(self, module: torch.nn.Module, precision: PrecisionWrapper) -> None:
        super().__init__()
        self._module = module
        # wrap(torch.compile(model)) (see split_compiled): not a child, as it holds
        # ``module`` as its own child, whose state would be listed twice.
        pair = getattr(precision, "_compiled", None)
        compiled = pair[1] if pair is not None and pair[0] is module else None
        object.__setattr__(self, "_compiled", compiled)
        self._mode: PrecisionMode = precision.precision_mode
        self._precision: PrecisionWrapper | None = precision
        # FSDP2 plans of mixed modes cast through MixedPrecisionPolicy: no second autocast
        plan = precision.fsdp_plan
        self._forward_context = plan is None or plan.forward_context
        self._forward_methods: frozenset[str] = frozenset()
        methods = getattr(precision, "forward_methods", None)
        if methods is None:  # the default: generate, where the model has one
            methods = ("generate",) if callable(getattr(module, "generate", None)) else ()
        for name in methods:
            self.mark_forward_method(name)  # checked by check_forward_methods before wrap
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
        if self._precision is not None:  # DDP: will this forward's backward all-reduce?
            self._precision._dist.note_forward()
        inner = self._compiled if self._compiled is not None else self.module
        return self._run_under_mode(inner, args, kwargs)

    def _run_under_mode(self, fn: Callable[..., Any], args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> Any:
        """``fn(*args, **kwargs)`` as the forward runs: inputs converted, in the mode's
        forward context, output converted."""
        mode = self._mode
        args, kwargs = mode.convert_input((args, kwargs))
        with mode.forward_context() if self._forward_context else contextlib.nullcontext():
            output = fn(*args, **kwargs)
        return mode.convert_output(output)

    # -- methods beyond forward ------------------------------------------------

    @property
    def forward_methods(self) -> frozenset[str]:
        """The inner module's methods that run under the mode (``generate``, …)."""
        return self._forward_methods

    def mark_forward_method(self, name: str) -> None:
        """Run the inner module's method ``name`` under the mode from now on, as the
        forward runs: its arguments converted, the mode's forward context (autocast,
        the default dtype), its result converted. Without this, ``model.name(...)``
        runs the inner method as it is (fp32 and no autocast in the mixed modes), and
        what it calls of the model inside (``self(...)`` in ``generate``) does too.
        """
        check_forward_methods(self.module, [name])
        self._forward_methods = self._forward_methods | {name}

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
            if name in self.__dict__.get("_forward_methods", ()) and callable(attr):
                return self._method_under_mode(attr)
            if name == "save_pretrained" and callable(attr):
                return self._saving_state_dict(attr)
            return attr

    def _method_under_mode(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def under_mode(*args: Any, **kwargs: Any) -> Any:
            return self._run_under_mode(method, args, kwargs)

        return under_mode

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
        state.setdefault("_compiled", None)  # copies made before these existed
        state.setdefault("_forward_methods", frozenset())
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
