"""Tensor helpers, the lowest layer: nested data, DTensor shards, devices, casts.

Imports nothing of mixprec but its exceptions.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .exceptions import WrapError

__all__ = ["apply_to_float_tensors", "cast_floating", "ddp_class", "device_of", "dtensor_class",
           "fsdp_module_class", "is_fully_sharded", "local_tensor", "local_tensors"]


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


def ddp_class() -> type | None:
    """``DistributedDataParallel`` if ``torch.nn.parallel`` was imported, else None."""
    module = sys.modules.get("torch.nn.parallel")
    return getattr(module, "DistributedDataParallel", None)


def fsdp_module_class() -> type | None:
    """FSDP2's ``FSDPModule`` if ``torch.distributed.fsdp`` was imported, else None
    (a model can only be sharded with FSDP2 once it was)."""
    module = sys.modules.get("torch.distributed.fsdp")
    return getattr(module, "FSDPModule", None)


def dtensor_class() -> type | None:
    """``DTensor`` if ``torch.distributed.tensor`` was imported, else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """True if ``model`` or a module inside it was sharded with FSDP2."""
    cls = fsdp_module_class()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (same storage: in-place changes reach it), else ``tensor``."""
    cls = dtensor_class()
    if cls is not None and isinstance(tensor, cls):
        return tensor.to_local()  # type: ignore[no-any-return]
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
