"""Import torchao on demand, with an error that says how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType

from mixprec.exceptions import MissingDependencyError

__all__ = ["MIN_TORCHAO", "import_torchao"]

#: The oldest torchao this plugin is tested with (and asks for in its requirements).
MIN_TORCHAO = (0, 18)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def import_torchao(submodule: str, *, mode: str) -> ModuleType:
    """Import ``torchao.<submodule>`` for ``mode``; raise a helpful error if torchao is missing
    or too old.

    :raises MissingDependencyError: torchao cannot be imported or is older than
        :data:`MIN_TORCHAO`.
    """
    wanted = ".".join(map(str, MIN_TORCHAO))
    try:
        torchao = importlib.import_module("torchao")
    except ImportError as exc:
        raise MissingDependencyError(
            f"Mode {mode!r} needs torchao, which cannot be imported ({exc}); "
            f"install it with: pip install 'torchao>={wanted}'",
            package=f"torchao>={wanted}",
        ) from None
    version = getattr(torchao, "__version__", "0")
    if _version_tuple(version) < MIN_TORCHAO:
        raise MissingDependencyError(
            f"Mode {mode!r} needs torchao {wanted} or newer, but {version} is installed; "
            f"upgrade it with: pip install -U 'torchao>={wanted}'",
            package=f"torchao>={wanted}",
        )
    return importlib.import_module(f"torchao.{submodule}")
