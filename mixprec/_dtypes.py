"""Floating-point dtypes by name: the one table the core and the plugins read.

A mode option names a dtype as ``"bf16"``, ``"bfloat16"``, ``"16"``, ``"fp16"``,
``"float16"``, ``"32"``, ``"fp32"``, ``"float32"``, ``"64"``, ``"fp64"`` or
``"float64"`` (or passes the torch dtype); checkpoints store the plain name
(``"bfloat16"``) so that they load with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .exceptions import ModeOptionError

__all__ = ["DTYPES", "dtype_name", "parse_dtype", "short_dtype_name"]

#: Every spelling a mode option accepts, by dtype.
DTYPES: dict[str, torch.dtype] = {
    "32": torch.float32, "fp32": torch.float32, "float32": torch.float32,
    "64": torch.float64, "fp64": torch.float64, "float64": torch.float64,
    "16": torch.float16, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
_SHORT = {torch.float32: "32", torch.float64: "64", torch.float16: "16", torch.bfloat16: "bf16"}


def parse_dtype(
    value: str | torch.dtype, allowed: Iterable[torch.dtype] | None = None, *,
    option: str = "dtype",
) -> torch.dtype:
    """The torch dtype ``value`` names, checked against ``allowed``.

    :param value: a torch dtype or one of the names in :data:`DTYPES`.
    :param allowed: the dtypes the option takes (default: all in :data:`DTYPES`).
    :param option: the option's name, for the error message.
    :raises mixprec.exceptions.ModeOptionError: an unknown name or a dtype not allowed.
    """
    choices = tuple(dict.fromkeys(DTYPES.values() if allowed is None else allowed))
    dtype = DTYPES.get(value) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or dtype not in choices:
        names = ", ".join(f"'{short_dtype_name(d)}'" for d in choices)
        raise ModeOptionError(f"Unsupported {option} {value!r}; use one of {names}.")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the plain name checkpoints store."""
    return str(dtype).removeprefix("torch.")


def short_dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``, ``torch.float16`` -> ``"16"``: as in mode names."""
    return _SHORT.get(dtype, dtype_name(dtype))
