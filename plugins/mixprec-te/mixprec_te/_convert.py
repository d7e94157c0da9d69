"""Carry out a :class:`~mixprec_te._policy.LayerPlan`: torch layers to TE layers and back.

Also the ``init_module`` side: while a model is built, ``torch.nn.Linear``,
``LayerNorm`` and ``RMSNorm`` construct TE layers where the same rules allow it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
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
    "cast_floating",
    "convert_layers",
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
        new = te.RMSNorm(layer.normalized_shape[0], eps=layer.eps,  # type: ignore[index]
                         params_dtype=dtype, device=device)
        pairs = [("weight", layer.weight)]
    for pname, old in pairs:
        param = getattr(new, pname)
        param.copy_(old)
        param.requires_grad_(old.requires_grad)  # type: ignore[union-attr]
    new.train(layer.training)
    BUILT.add(new)
    return new  # type: ignore[no-any-return]


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


@torch.no_grad()
def cast_floating(module: torch.nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """Cast floating parameters and buffers outside TE layers to ``dtype``.

    TE layers keep what they were built with (mixprec builds its own in ``dtype``).
    Returns the numbers of parameters and buffers cast.
    """
    te_tensors = {id(t) for m in module.modules() if is_te_module(m)
                  for t in (*m.parameters(), *m.buffers())}
    n_params = n_buffers = 0
    seen: set[int] = set()
    for sub in module.modules():
        if is_te_module(sub):
            continue
        for p in sub._parameters.values():
            if p is None or id(p) in seen or id(p) in te_tensors:
                continue
            seen.add(id(p))
            if p.is_floating_point() and p.dtype is not dtype:
                p.data = p.data.to(dtype)
                n_params += 1
        for key, buf in sub._buffers.items():
            if buf is None or id(buf) in te_tensors:
                continue
            if buf.is_floating_point() and buf.dtype is not dtype:
                sub._buffers[key] = buf.to(dtype)
                n_buffers += 1
    return n_params, n_buffers


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
    return replacement  # type: ignore[no-any-return]


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
        return layer  # type: ignore[no-any-return]

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
        return layer  # type: ignore[no-any-return]

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
        return layer  # type: ignore[no-any-return]

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
