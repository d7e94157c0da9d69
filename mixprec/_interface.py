"""The mode interface: what a precision or optimizer mode may change.

A mode implements only what it changes; every method here has a default that
leaves training as it is. The wrapper calls them at fixed points and knows no
mode by name.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from ._tensors import check_fits
from .exceptions import NumericsError

if TYPE_CHECKING:
    from ._scaler import LossScaler
    from ._wrapper import PrecisionWrapper

__all__ = [
    "TAGS",
    "FSDPPlan",
    "ModeSpec",
    "OptimizerMode",
    "PrecisionMode",
    "StepHooks",
    "build_context",
    "default_dtype",
    "step_in_dtype",
    "thread_default_dtype",
]

#: Properties a mode can declare in :attr:`ModeSpec.tags`, read by ``mixprec bench`` and
#: ``mixprec modes`` instead of mode names.
TAGS: dict[str, str] = {
    "frozen-weights": "quantizes and freezes the weights it converts: trained as a "
                      "fine-tune of adapters (LoRA) on top",
    "slow-on-cpu": "runs on a CPU only through a slow reference path",
    "cuda-only": "needs a CUDA GPU",
}


@dataclass(frozen=True)
class ModeSpec:
    """What a plugin says about one mode it provides.

    :param name: the mode's name in mode strings (``"nf4-dq"``).
    :param factory: builds the mode object from keyword options.
    :param summary: one line shown by ``mixprec modes``.
    :param kind: ``"precision"`` or ``"optimizer"``.
    :param requires: what the mode needs to run, in words (``"CUDA"``); empty if nothing.
    :param api_version: the plugin API version the mode was written for; a mode
        asking for a newer one than this mixprec has is reported, not loaded.
    :param tags: properties of the mode from :data:`TAGS` (``{"frozen-weights"}``),
        so that tools decide by property, not by name.

    .. versionchanged:: 0.2
       ``tags`` (plugin API 2).
    """

    name: str
    factory: Callable[..., PrecisionMode | OptimizerMode]
    summary: str
    kind: Literal["precision", "optimizer"] = "precision"
    requires: str = ""
    api_version: int = 1
    tags: AbstractSet[str] = frozenset()

    def __post_init__(self) -> None:
        tags = (self.tags,) if isinstance(self.tags, str) else self.tags
        object.__setattr__(self, "tags", frozenset(tags))


class StepHooks(Protocol):
    """What the wrapper calls on an observer of training (``wrap(..., monitor=…)``).

    ``attach`` once after ``wrap`` converted the model; ``before_step`` after the
    gradients are unscaled and checked, before the inner optimizer steps (also when
    the step will be skipped: ``wrapper.step_will_be_skipped``); ``after_step`` after
    the step (taken or skipped) and the loss-scale update.
    """

    def attach(self, wrapper: PrecisionWrapper) -> None: ...

    def before_step(self, wrapper: PrecisionWrapper) -> None: ...

    def after_step(self, wrapper: PrecisionWrapper, skipped: bool) -> None: ...


@dataclass(frozen=True)
class FSDPPlan:
    """How a precision mode runs on a model sharded with FSDP2 (``fully_shard``).

    A mode supports FSDP2 by returning one from :meth:`PrecisionMode.fsdp_plan` (it
    may raise :class:`~mixprec.exceptions.ModeOptionError` for option combinations it
    cannot shard). :func:`mixprec.distributed.fully_shard` applies it before sharding;
    ``wrap`` follows it after.

    :param param_dtype: ``MixedPrecisionPolicy.param_dtype``: the dtype FSDP
        all-gathers the parameters in and the forward computes with (None: as stored).
    :param reduce_dtype: ``MixedPrecisionPolicy.reduce_dtype``: the dtype gradients
        are reduce-scattered in (None: ``param_dtype``).
    :param storage_dtype: floating-point parameters are cast to this after
        ``convert_module`` and before sharding: the dtype of the sharded parameters
        the optimizer steps (None: as ``convert_module`` left them).
    :param convert_module: run the mode's ``convert_module`` on the unsharded model.
    :param forward_context: keep the mode's ``forward_context`` (autocast, …) around
        the sharded forward; False where ``param_dtype`` already does its job.

    .. versionadded:: 0.1
    """

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    storage_dtype: torch.dtype | None = None
    convert_module: bool = True
    forward_context: bool = True

    def describe(self) -> str:
        def name(d: torch.dtype | None) -> str:
            return "as stored" if d is None else str(d).removeprefix("torch.")
        return (f"FSDP2 MixedPrecisionPolicy(param_dtype={name(self.param_dtype)}, "
                f"reduce_dtype={name(self.reduce_dtype)})")


class PrecisionMode:
    """Base class of precision modes: how the model is stored and run.

    Subclasses set :attr:`name` and override what they change. Options must be
    reported by :meth:`options` as plain Python values so that checkpoints load
    with ``torch.load(..., weights_only=True)``.
    """

    #: the registered name of the mode (``"bf16-mixed"``).
    name: str = ""
    #: True if gradients need dynamic loss scaling (fp16).
    needs_scaling: bool = False
    #: True to keep fp32 master copies of the parameters in the optimizer.
    master_weights: bool = False

    # -- description --------------------------------------------------------

    def options(self) -> dict[str, Any]:
        """The options this mode was built with, as plain values (for checkpoints)."""
        return {}

    def describe(self) -> str:
        """One line for the wrapper's summary."""
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}({opts})" if opts else self.name

    @property
    def param_dtype(self) -> torch.dtype | None:
        """The dtype floating-point parameters are stored in, or None if unchanged."""
        return None

    # -- before anything changes ---------------------------------------------

    def validate(self, module: torch.nn.Module, device: torch.device) -> None:
        """Raise a :class:`mixprec.MixprecError` if this mode cannot wrap ``module``.

        Called before anything is mutated: every check that can fail belongs here.
        """

    # -- conversion ----------------------------------------------------------

    def convert_module(self, module: torch.nn.Module) -> list[str]:
        """Change ``module`` in place (cast, swap layers); return summary lines.

        Parameters kept at the same dotted name keep their optimizer entries;
        a parameter replaced by a new tensor takes over the old one's entry if
        it requires grad and is dropped from the optimizer otherwise.
        """
        return []

    def init_context(self, device: torch.device | str | None = None) -> contextlib.AbstractContextManager[None]:
        """A context in which a model is built directly in this mode's dtype and device."""
        return build_context(None, device)

    def unwrap_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Turn the wrapped module back into a plain one for export."""
        return module

    def fsdp_plan(self) -> FSDPPlan | None:
        """How this mode runs on a model sharded with FSDP2; None (the default)
        refuses FSDP2 with a clear error. See :func:`mixprec.distributed.fully_shard`."""
        return None

    # -- forward ---------------------------------------------------------------

    def forward_context(self) -> contextlib.AbstractContextManager[None]:
        """The context the forward pass runs in (autocast, fp8 autocast, …)."""
        return contextlib.nullcontext()

    def convert_input(self, data: Any) -> Any:
        """Convert the forward's arguments (nested collections of tensors)."""
        return data

    def convert_output(self, data: Any) -> Any:
        """Convert the forward's result (nested collections of tensors)."""
        return data

    # -- backward and step -----------------------------------------------------

    def create_scaler(self) -> LossScaler | None:
        """The loss scaler this mode trains with, or None."""
        return None

    def optimizer_step_context(
        self, optimizer: torch.optim.Optimizer
    ) -> contextlib.AbstractContextManager[None]:
        """A context around the inner optimizer's ``step`` and ``load_state_dict``."""
        return contextlib.nullcontext()

    # -- checkpoints -------------------------------------------------------------

    def module_state_dict(
        self, module: torch.nn.Module, state: dict[str, Any]
    ) -> dict[str, Any]:
        """Adjust the module's state dict before it is returned (e.g. quant state)."""
        return state

    def load_module_state_dict(
        self, module: torch.nn.Module, state: Mapping[str, Any], strict: bool
    ) -> Any:
        """Load a state dict into the module; return torch's ``_IncompatibleKeys``."""
        return module.load_state_dict(state, strict=strict)

    def state_dict(self) -> dict[str, Any]:
        """Extra state of the mode itself (besides weights, optimizer and scaler)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class OptimizerMode:
    """Base class of optimizer modes: replace the optimizer (8-bit Adam, …)."""

    name: str = ""
    #: True if the replacement optimizer can step FSDP2's DTensor shards.
    fsdp_compatible: bool = False

    def options(self) -> dict[str, Any]:
        """The options this mode was built with, as plain values."""
        return {}

    def describe(self) -> str:
        """One line for the wrapper's summary."""
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}({opts})" if opts else self.name

    def validate(
        self, optimizer: torch.optim.Optimizer, module: torch.nn.Module, device: torch.device
    ) -> None:
        """Raise a :class:`mixprec.MixprecError` if ``optimizer`` cannot be converted."""

    def convert_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        module: torch.nn.Module,
        param_names: Mapping[torch.Tensor, str],
    ) -> tuple[torch.optim.Optimizer, list[str]]:
        """Return the replacement optimizer and summary lines.

        ``param_names`` maps each parameter in ``optimizer`` (an fp32 master copy
        where the precision mode keeps them) to the dotted name of the model
        parameter it stands for. The returned optimizer must hold the same
        parameters in the same groups.
        """
        return optimizer, []


@contextlib.contextmanager
def build_context(
    dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Iterator[None]:
    """Build tensors in ``dtype`` (torch's default dtype) and on ``device`` inside the
    block; the previous default dtype is restored when it ends, also on errors.

    The building block of :meth:`PrecisionMode.init_context` for plugin modes.

    .. versionadded:: 0.1
    """
    with default_dtype(dtype):
        if device is None:
            yield
        else:
            with torch.device(device):
                yield


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Set torch's default dtype inside the block; restore it even on errors.

    torch's default dtype is process-wide: every thread sees it while the block runs.
    That is what building a model needs (constructors that read
    ``torch.get_default_dtype()`` included); for a forward, which may run in several
    threads at once, use :func:`thread_default_dtype`.
    """
    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


#: Factories whose result is in the default dtype whenever no dtype is given.
_FLOAT_FACTORIES = frozenset({
    torch.empty, torch.empty_permuted, torch.empty_strided, torch.zeros, torch.ones,
    torch.eye, torch.rand, torch.randn, torch.linspace, torch.logspace, torch.scalar_tensor,
    torch.bartlett_window, torch.blackman_window, torch.hamming_window, torch.hann_window,
    torch.kaiser_window, torch.fft.fftfreq, torch.fft.rfftfreq,
})
#: Factories whose result is in the default dtype for float Python data only
#: (``torch.full((2,), 1)`` is int64, ``torch.tensor(x_numpy)`` keeps the array's dtype).
_DATA_FACTORIES = frozenset({torch.full, torch.arange, torch.tensor, torch.as_tensor,
                             torch.asarray})


def _python_floats(data: Any) -> bool:
    """True if torch infers its default dtype for ``data``: Python numbers (in lists and
    tuples) with a float among them and no complex, or an empty list."""
    kinds: set[type] = set()

    def walk(x: Any) -> bool:
        if type(x) in (bool, int, float, complex):
            kinds.add(type(x))
            return True
        return isinstance(x, (list, tuple)) and all(walk(v) for v in x)

    return walk(data) and complex not in kinds and (float in kinds or not kinds)


def _makes_default_float(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if kwargs.get("dtype") is not None or "out" in kwargs:
        return False
    if func in _FLOAT_FACTORIES:
        return True
    if func not in _DATA_FACTORIES:
        return False
    if func is torch.full:
        return _python_floats(args[1] if len(args) > 1 else kwargs.get("fill_value"))
    if func is torch.arange:
        return _python_floats([*args, *(kwargs[k] for k in ("start", "end", "step")
                                        if k in kwargs)])
    if func is torch.as_tensor and len(args) > 1:  # dtype given by position
        return False
    data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
    return _python_floats(data)


class _ThreadDefaultDtype(torch.overrides.TorchFunctionMode):
    """Gives tensor factories called without a dtype this mode's dtype where torch would
    use its default dtype. torch keeps its function-mode stack per thread."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _FLOAT_FACTORIES or func in _DATA_FACTORIES:
            if _makes_default_float(func, args, kwargs):
                kwargs = {**kwargs, "dtype": self.dtype}
        return func(*args, **kwargs)


@contextlib.contextmanager
def thread_default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Inside the block, floating-point tensors this thread creates without a dtype
    (``torch.zeros(3)``, ``torch.tensor(0.5)``, a layer built in a forward) are created
    in ``dtype``; other threads, and torch's process-wide default dtype, are untouched.

    For :meth:`PrecisionMode.forward_context` of modes that run the forward in one
    dtype: forwards may run in several threads at once, and a forward that changed
    the process-wide default dtype would change every other thread's tensors (and,
    overlapping, could leave it changed). ``torch.get_default_dtype()`` still reports
    the process-wide value inside the block. Nothing is changed for ``dtype=None``.

    .. versionadded:: 0.2
    """
    if dtype is None:
        yield
        return
    with _ThreadDefaultDtype(dtype):
        yield


#: Gradients already unscaled into a higher dtype by the wrapper, by ``id`` of the
#: parameter: :func:`step_in_dtype` steps with them instead of widening the rounded
#: low-precision gradient (an fp16 gradient of 2e-8 flushes to 0 once unscaled in fp16).
_WIDE_GRADS: contextvars.ContextVar[Mapping[int, torch.Tensor] | None] = contextvars.ContextVar(
    "mixprec_wide_grads", default=None)


@contextlib.contextmanager
def wide_grads(grads: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Offer ``grads`` (by ``id`` of the parameter) to :func:`step_in_dtype` in the block."""
    token = _WIDE_GRADS.set(grads)
    try:
        yield
    finally:
        _WIDE_GRADS.reset(token)


@contextlib.contextmanager
def step_in_dtype(
    optimizer: torch.optim.Optimizer, low: torch.dtype, high: torch.dtype,
    write_back: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> Iterator[None]:
    """Give the optimizer ``high`` copies of its ``low`` parameters (and grads) for the block.

    The optimizer's lists hold the copies (with the parameters' state) in the
    block; after it the values are rounded back into the parameters in place and
    the state returns to the parameter objects, so optimizer state created or
    loaded in the block stays in ``high``. Not ``p.data = p.data.to(high)``: a
    dtype change through ``.data`` drops the parameter's gradient accumulator and
    the hooks on it — DDP's gradient all-reduce stopped after the first step — and
    a DTensor (FSDP2) parameter's local shard does not follow ``.data``.

    For :meth:`PrecisionMode.optimizer_step_context` of modes that store weights in
    ``low`` but step in ``high`` (the core's ``16-true``, stochastic rounding).

    :param write_back: ``write_back(param, updated_copy)`` puts the result into the
        parameter (under ``no_grad``); default ``param.copy_(updated_copy)``.

    .. versionadded:: 0.1
    """
    swapped: list[tuple[list[Any], int, torch.Tensor, torch.Tensor]] = []
    wide = _WIDE_GRADS.get() or {}
    try:
        with torch.no_grad():
            for group in optimizer.param_groups:
                params = group["params"]
                for i, p in enumerate(params):
                    if p.dtype is not low:
                        continue
                    copy = p.detach().to(high).requires_grad_(p.requires_grad)
                    if p.grad is not None:
                        g = wide.get(id(p))
                        copy.grad = g.to(high) if g is not None else p.grad.to(high)
                    if p in optimizer.state:
                        optimizer.state[copy] = optimizer.state.pop(p)
                    params[i] = copy
                    swapped.append((params, i, p, copy))
        yield
    finally:
        overflow: NumericsError | None = None
        if sys.exc_info()[0] is None:  # an fp16 weight past 65504 is never written
            try:
                check_fits([(f"of shape {tuple(p.shape)}", copy) for _, _, p, copy in swapped],
                           [p.dtype for _, _, p, _ in swapped])
            except NumericsError as exc:
                overflow = exc
        with torch.no_grad():
            for params, i, p, copy in swapped:
                if overflow is None:
                    if write_back is None:
                        p.copy_(copy)
                    else:
                        write_back(p, copy)
                params[i] = p
                if copy in optimizer.state:
                    optimizer.state[p] = optimizer.state.pop(copy)
        if overflow is not None:
            raise overflow
