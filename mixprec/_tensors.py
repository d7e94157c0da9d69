"""Tensor helpers, the lowest layer: nested data, DTensor shards, devices, casts.

Imports nothing of mixprec but its exceptions.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from .exceptions import NumericsError, WrapError

__all__ = [
    "apply_to_float_tensors",
    "cast_floating",
    "check_fits",
    "compiled_module_class",
    "ddp_class",
    "device_of",
    "dtensor_class",
    "fsdp_module_class",
    "is_dtensor",
    "is_fully_sharded",
    "local_tensor",
    "local_tensors",
    "total_grad_norm",
]


def apply_to_float_tensors(data: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Return ``data`` with ``fn`` applied to each floating-point tensor.

    Walks tuples (named ones too), lists, dicts (keeping their type) and
    dataclass instances. Integer, boolean and complex tensors and every other
    object are returned untouched.
    """
    if isinstance(data, torch.Tensor):
        return fn(data) if data.is_floating_point() else data
    if isinstance(data, Mapping):
        items = {k: apply_to_float_tensors(v, fn) for k, v in data.items()}
        try:
            return type(data)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(apply_to_float_tensors(v, fn) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(apply_to_float_tensors(v, fn) for v in data)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        changes = {
            f.name: apply_to_float_tensors(getattr(data, f.name), fn)
            for f in dataclasses.fields(data)
            if f.init
        }
        return dataclasses.replace(data, **changes)
    return data


# -- torch.distributed probes (cheap: nothing distributed is imported unless in use) ----


def ddp_class() -> Any:
    """``DistributedDataParallel`` if ``torch.nn.parallel`` was imported, else None."""
    module = sys.modules.get("torch.nn.parallel")
    return getattr(module, "DistributedDataParallel", None)


def fsdp_module_class() -> Any:
    """FSDP2's ``FSDPModule`` if ``torch.distributed.fsdp`` was imported, else None
    (a model can only be sharded with FSDP2 once it was)."""
    module = sys.modules.get("torch.distributed.fsdp")
    return getattr(module, "FSDPModule", None)


def dtensor_class() -> Any:
    """``DTensor`` if ``torch.distributed.tensor`` was imported, else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def compiled_module_class() -> Any:
    """``OptimizedModule`` (what ``torch.compile(module)`` returns) if torch's dynamo was
    imported, else None (nothing can have been compiled)."""
    module = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(module, "OptimizedModule", None)


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """True if ``model`` or a module inside it was sharded with FSDP2."""
    cls = fsdp_module_class()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for an FSDP2/tensor-parallel ``DTensor``."""
    cls = dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (same storage: in-place changes reach it), else ``tensor``."""
    cls = dtensor_class()
    if cls is not None and isinstance(tensor, cls):
        return tensor.to_local()
    return tensor


def local_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`local_tensor` of each (one lookup of the DTensor class for all)."""
    cls = dtensor_class()
    if cls is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, cls) else t for t in tensors]


# -- modules -------------------------------------------------------------------------------


def device_of(module: torch.nn.Module) -> torch.device:
    """The one device holding ``module``'s parameters and buffers (cpu if it has none).

    :raises mixprec.exceptions.WrapError: the tensors are on several devices.
    """
    devices = {t.device for t in (*module.parameters(), *module.buffers())}
    if len(devices) > 1:
        raise WrapError(
            f"The model's tensors are on several devices ({', '.join(sorted(map(str, devices)))}); "
            "move it to one device before wrapping."
        )
    return devices.pop() if devices else torch.device("cpu")


def cast_floating(
    module: torch.nn.Module, dtype: torch.dtype, *, buffers: bool = True,
    skip: Callable[[str, torch.nn.Module], bool] | None = None,
) -> tuple[int, int]:
    """Cast ``module``'s floating-point parameters (in place, keeping the Parameter
    objects) and buffers to ``dtype``; return how many of each were cast.

    :param buffers: cast buffers too.
    :param skip: ``skip(name, submodule)`` True leaves that submodule's own tensors as
        they are (e.g. layers a mode keeps in full precision).
    """
    n_params = n_buffers = 0
    with torch.no_grad():
        for name, sub in module.named_modules():
            if skip is not None and skip(name, sub):
                continue
            for p in sub._parameters.values():
                if p is not None and p.is_floating_point() and p.dtype is not dtype:
                    p.data = p.data.to(dtype)
                    n_params += 1
            if not buffers:
                continue
            for key, buf in sub._buffers.items():
                if buf is not None and buf.is_floating_point() and buf.dtype is not dtype:
                    sub._buffers[key] = buf.to(dtype)
                    n_buffers += 1
    return n_params, n_buffers


def check_fits(named: Sequence[tuple[str, torch.Tensor]], dtypes: Sequence[torch.dtype]) -> None:
    """Raise :class:`NumericsError` if a value would become inf when rounded into its
    target dtype (only fp16's range is narrower than the fp32 it is computed in).

    :param named: (name, high-precision tensor) pairs about to be written.
    :param dtypes: the dtype each will be written into.
    """
    limit = torch.finfo(torch.float16).max
    for (name, t), dtype in zip(named, dtypes, strict=True):
        if dtype is not torch.float16 or not t.is_floating_point():
            continue
        peak = float(local_tensor(t).detach().abs().max()) if t.numel() else 0.0
        if peak >= limit + 16:  # round-to-nearest keeps values below 65520 finite
            raise NumericsError(
                f"The optimizer step would push parameter {name!r} to {peak:.4g}, beyond "
                f"fp16's range ({limit:g}), so its fp16 weights were not written (they stay "
                "finite; the optimizer state has advanced). Lower the learning rate, add "
                "weight decay or gradient clipping, or train this model in a bf16 mode.",
                parameter=name,
            )


def total_grad_norm(grads: Sequence[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of order ``norm_type`` of all ``grads`` together, as a scalar tensor.

    fp16 gradients are reduced in fp32: their own norm overflows to inf once it passes
    65504 although every element is finite. Other dtypes take torch's foreach path
    (the same numbers as ``torch.nn.utils.clip_grad_norm_``).
    """
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    norms = []
    for (_, dtype), group in groups.items():
        upcast = torch.float32 if dtype is torch.float16 else None
        norms += list(torch._foreach_norm(group, norm_type, dtype=upcast))
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
