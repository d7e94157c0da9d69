"""Apply a function to every floating-point tensor in nested data."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["apply_to_float_tensors"]


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
