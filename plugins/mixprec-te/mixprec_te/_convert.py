"""Carry out a :class:`~mixprec_te._policy.LayerPlan`: torch layers to TE layers and back.

Also the ``init_module`` side: while a model is built, ``torch.nn.Linear``,
``LayerNorm`` and ``RMSNorm`` construct TE layers where the same rules allow it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch

from ._policy import (
    LayerPlan,
    layernorm_keep_reason,
    linear_fits,
    rmsnorm_keep_reason,
)
from ._te import is_te_module

__all__ = [
    "BUILT",
    "convert_layers",
    "kept_by_te",
    "revert_layers",
    "te_layer_from_torch",
    "torch_layer_from_te",
    "torch_layers_as_te",
]

#: TE layers that mixprec built (by conversion or in ``init_module``), as opposed
#: to TE layers a user placed by hand.
BUILT: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def _submodule(root: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


@torch.no_grad()
def te_layer_from_torch(
    te: ModuleType, layer: Any, dtype: torch.dtype, device: torch.device | str
) -> torch.nn.Module:
    """A TE layer with ``layer``'s configuration and values (cast to ``dtype``)."""
    if isinstance(layer, torch.nn.Linear):
        has_bias = layer.bias is not None
        new = te.Linear(layer.in_features, layer.out_features, bias=has_bias,
                        params_dtype=dtype, device=device)
        pairs: list[tuple[str, torch.Tensor]] = [("weight", layer.weight)]
        if has_bias:
            pairs.append(("bias", layer.bias))
    elif isinstance(layer, torch.nn.LayerNorm):
        new = te.LayerNorm(layer.normalized_shape[0], eps=layer.eps, params_dtype=dtype, device=device)
        pairs = [("weight", layer.weight), ("bias", layer.bias)]
    else:  # nn.RMSNorm
        new = te.RMSNorm(layer.normalized_shape[0], eps=layer.eps,
                         params_dtype=dtype, device=device)
        pairs = [("weight", layer.weight)]
    for pname, old in pairs:
        param = getattr(new, pname)
        param.copy_(old)
        param.requires_grad_(old.requires_grad)
    new.train(layer.training)
    BUILT.add(new)
    return new


@torch.no_grad()
def torch_layer_from_te(layer: Any) -> torch.nn.Module:
    """The torch layer a TE ``Linear``/``LayerNorm``/``RMSNorm`` stands for, same values."""
    weight: torch.Tensor = layer.weight
    device, dtype = weight.device, weight.dtype
    kind = type(layer).__name__
    pairs: list[tuple[str, torch.Tensor]] = [("weight", weight)]
    if kind == "Linear":
        has_bias = bool(getattr(layer, "use_bias", False))
        new: torch.nn.Module = torch.nn.Linear(int(layer.in_features), int(layer.out_features),
                                               bias=has_bias, device=device, dtype=dtype)
        if has_bias:
            pairs.append(("bias", layer.bias))
    elif kind == "LayerNorm":
        new = torch.nn.LayerNorm(tuple(weight.shape), eps=float(layer.eps), device=device,
                                 dtype=dtype)
        pairs.append(("bias", layer.bias))
    elif kind == "RMSNorm":
        new = torch.nn.RMSNorm(tuple(weight.shape), eps=float(layer.eps), device=device,
                               dtype=dtype)
    else:
        raise TypeError(f"no torch layer for {type(layer).__qualname__}")
    for pname, old in pairs:
        param = getattr(new, pname)
        param.copy_(old)
        param.requires_grad_(old.requires_grad)
    new.train(layer.training)
    return new


def convert_layers(
    te: ModuleType, module: torch.nn.Module, plan: LayerPlan, dtype: torch.dtype,
    device: torch.device,
) -> list[str]:
    """Replace the layers ``plan`` converts with TE layers on ``device``; return their names.

    TE initializes the weights of each new layer before they are overwritten; the
    CPU and CUDA random states are restored afterwards so conversion does not shift
    the user's random streams.
    """
    done = []
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        for decision in plan.to_convert:
            parent, child = _submodule(module, decision.name)
            old = getattr(parent, child)
            setattr(parent, child, te_layer_from_torch(te, old, dtype, device))
            done.append(decision.name)
    return done


def revert_layers(module: torch.nn.Module, names: list[str]) -> list[str]:
    """Turn the TE layers at ``names`` back into torch layers; return the names."""
    for name in names:
        parent, child = _submodule(module, name)
        setattr(parent, child, torch_layer_from_te(getattr(parent, child)))
    return names


def kept_by_te(module: torch.nn.Module) -> Callable[[str, torch.nn.Module], bool]:
    """The ``skip`` of :func:`mixprec.utils.cast_floating` for ``module``: True for TE
    layers, the modules inside them and modules sharing a tensor with one.

    TE layers keep the dtype they were built with (mixprec builds its own in the
    weights dtype; hand-placed ones are the user's choice), and so do their tensors
    where another module holds them too.
    """
    roots = [name for name, sub in module.named_modules() if is_te_module(sub)]
    te_tensors = {id(t) for name in roots for sub in (module.get_submodule(name),)
                  for t in (*sub.parameters(), *sub.buffers())}

    def skip(name: str, sub: torch.nn.Module) -> bool:
        if is_te_module(sub) or any(not r or name.startswith(r + ".") for r in roots):
            return True
        own = (*sub._parameters.values(), *sub._buffers.values())
        return any(t is not None and id(t) in te_tensors for t in own)

    return skip


class _ReplacementMeta(type):
    """``isinstance(x, nn.Linear)`` keeps its meaning while ``nn.Linear`` is replaced."""

    _original: type

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls._original)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, cls._original)


def _replacement(
    original: type[torch.nn.Module], build: Any
) -> type[torch.nn.Module]:
    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        if cls is not replacement:  # a subclass defined inside the block
            return original.__new__(cls)
        return build(*args, **kwargs)

    replacement: Any = _ReplacementMeta(
        original.__name__, (original,),
        {"__new__": __new__, "_original": original, "__module__": original.__module__,
         "__qualname__": original.__qualname__},
    )
    return replacement


@contextlib.contextmanager
def torch_layers_as_te(
    te: ModuleType, device: torch.device | str
) -> Iterator[None]:
    """Inside the block ``torch.nn.Linear``/``LayerNorm``/``RMSNorm`` build TE layers on
    ``device`` where the layer rules allow it, and the torch layer otherwise.

    Code that refers to the classes as ``torch.nn.Linear`` (or ``nn.Linear``) is
    affected; a name imported before (``from torch.nn import Linear``) is not.
    Layers left as torch layers are converted, or named, when the model is wrapped.
    """
    nn = torch.nn
    linear, layernorm = nn.Linear, nn.LayerNorm
    rmsnorm = getattr(nn, "RMSNorm", None)
    te_rmsnorm = getattr(te, "RMSNorm", None)

    def _dtype(dtype: torch.dtype | None) -> torch.dtype:
        return dtype if dtype is not None else torch.get_default_dtype()

    def build_linear(in_features: int, out_features: int, bias: bool = True,
                     device: Any = None, dtype: torch.dtype | None = None) -> torch.nn.Module:
        if not linear_fits(in_features, out_features):
            return linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        layer = te.Linear(in_features, out_features, bias=bias, params_dtype=_dtype(dtype),
                          device=device if device is not None else target)
        BUILT.add(layer)
        return layer

    def build_layernorm(normalized_shape: Any, eps: float = 1e-5, elementwise_affine: bool = True,
                        bias: bool = True, device: Any = None,
                        dtype: torch.dtype | None = None) -> torch.nn.Module:
        if layernorm_keep_reason(normalized_shape, elementwise_affine, bias) is not None:
            return layernorm(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                             bias=bias, device=device, dtype=dtype)
        size = normalized_shape if isinstance(normalized_shape, int) else next(iter(normalized_shape))
        layer = te.LayerNorm(size, eps=eps, params_dtype=_dtype(dtype),
                             device=device if device is not None else target)
        BUILT.add(layer)
        return layer

    def build_rmsnorm(normalized_shape: Any, eps: float | None = None,
                      elementwise_affine: bool = True, device: Any = None,
                      dtype: torch.dtype | None = None) -> torch.nn.Module:
        assert rmsnorm is not None
        if te_rmsnorm is None or rmsnorm_keep_reason(normalized_shape, eps, elementwise_affine,
                               te_rmsnorm is not None) is not None:
            return rmsnorm(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                           device=device, dtype=dtype)
        size = normalized_shape if isinstance(normalized_shape, int) else next(iter(normalized_shape))
        layer = te_rmsnorm(size, eps=eps, params_dtype=_dtype(dtype),
                           device=device if device is not None else target)
        BUILT.add(layer)
        return layer

    target = device
    patches: dict[str, type[torch.nn.Module]] = {
        "Linear": _replacement(linear, build_linear),
        "LayerNorm": _replacement(layernorm, build_layernorm),
    }
    if rmsnorm is not None:
        patches["RMSNorm"] = _replacement(rmsnorm, build_rmsnorm)
    originals = {name: getattr(nn, name) for name in patches}
    try:
        for name, cls in patches.items():
            setattr(nn, name, cls)
        yield
    finally:
        for name, cls in originals.items():
            setattr(nn, name, cls)
