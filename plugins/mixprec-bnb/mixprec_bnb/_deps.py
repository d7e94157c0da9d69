"""The bitsandbytes import, with the error a user can act on."""

from __future__ import annotations

import importlib
from types import ModuleType

from mixprec.exceptions import MissingDependencyError

__all__ = ["require_bitsandbytes"]


def require_bitsandbytes(mode: str) -> ModuleType:
    """Import bitsandbytes or raise :class:`MissingDependencyError` naming ``mode``."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        raise MissingDependencyError(
            f"Mode {mode!r} needs bitsandbytes, which cannot be imported ({exc}); "
            "install it with: pip install mixprec-bnb (or pip install 'bitsandbytes>=0.50').",
            package="bitsandbytes>=0.50",
        ) from None
