"""The module-level API: ``mixprec.wrap``, ``mixprec.unwrap``, ``mixprec.init_module``,
each a thin call into :class:`~mixprec.PrecisionWrapper`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, overload

import torch

from ._module import _WRAPPED, WrappedModule, uncompiled
from ._optimizer import WrappedOptimizer
from ._wrapper import ModeLike, OptimizerLike, PrecisionWrapper

__all__ = ["init_module", "unwrap", "wrap"]


@overload
def wrap(model: torch.nn.Module, optimizer: None = None, mode: ModeLike = ..., **options: Any) -> WrappedModule: ...
@overload
def wrap(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, mode: ModeLike = ..., **options: Any
) -> tuple[WrappedModule, WrappedOptimizer]: ...
@overload
def wrap(
    model: torch.nn.Module, optimizer: Sequence[torch.optim.Optimizer], mode: ModeLike = ...,
    **options: Any,
) -> tuple[WrappedModule, tuple[WrappedOptimizer, ...]]: ...


def wrap(
    model: torch.nn.Module, optimizer: OptimizerLike = None,
    mode: ModeLike = "32-true", **options: Any,
) -> WrappedModule | tuple[WrappedModule, WrappedOptimizer | tuple[WrappedOptimizer, ...]]:
    """Run ``model`` (and ``optimizer``) in ``mode``.

    Returns ``(model, optimizer)`` — or the model alone when no optimizer is
    given — sharing one :class:`PrecisionWrapper`. With a list or tuple of
    optimizers (a GAN's generator and discriminator) it returns ``(model,
    (opt_a, opt_b, ...))``: one loss scale for all, each optimizer's step skipped
    on its own inf/NaN gradients, the scale updated once all have stepped (the
    rules: README, "Several optimizers"). Keyword ``options`` go to the
    :class:`PrecisionWrapper` and the named precision mode
    (``wrap(model, opt, "bf16-true", master_weights=True)``). Atomic: if it raises,
    model and optimizer are exactly as before.
    """
    return PrecisionWrapper(mode, **options).wrap(model, optimizer)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Return the plain module inside a wrapped one, for export.

    Where the mode keeps fp32 masters the parameters get the master values (the
    module becomes fp32). The wrapper is finished afterwards: keep training with
    a new ``wrap``. A compiled wrapped module (``torch.compile(wrapped)``) gives the
    plain module too (compile it again for the next run). A module that is not wrapped
    is returned as it is.
    """
    wrapped = uncompiled(model)
    if not isinstance(wrapped, WrappedModule):
        return model
    precision = wrapped.precision
    inner = wrapped.module
    if precision.masters is not None:
        precision.masters.move_to_model()
        precision.masters = None
    _WRAPPED.discard(inner)
    return precision.precision_mode.unwrap_module(inner)


@contextlib.contextmanager
def init_module(
    mode: ModeLike = "32-true", device: torch.device | str | None = None, **options: Any
) -> Iterator[PrecisionWrapper]:
    """Build a model directly in ``mode``'s dtype (and on ``device``, e.g. ``"meta"``).

    Yields the :class:`PrecisionWrapper`, ready for ``.wrap(model, opt)``. The
    default dtype is restored when the block ends, also on errors.
    """
    precision = PrecisionWrapper(mode, **options)
    with precision.init_module(device):
        yield precision
