"""Selecting modules by dotted name: the one ``ignore_modules`` rule of every mode.

A pattern selects a module when it equals the module's dotted name or the name
of one of its parents (``"lm_head"`` selects ``lm_head`` and everything inside
it, not ``lm_head2``). A pattern holding ``*``, ``?`` or ``[`` is an ``fnmatch``
glob matched the same way (``"blocks.*.attn"`` selects ``blocks.0.attn`` and
``blocks.0.attn.q``; ``*`` also crosses dots).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable

from .exceptions import ModeOptionError

__all__ = ["closest_name", "match_module", "normalize_patterns"]

_GLOB_CHARS = frozenset("*?[")


def normalize_patterns(patterns: str | Iterable[str], option: str) -> tuple[str, ...]:
    """A string or iterable of strings as a sorted tuple of unique patterns.

    :param option: the option's name, for the error message.
    :raises mixprec.exceptions.ModeOptionError: an entry is not a non-empty string.
    """
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    for item in items:
        if not isinstance(item, str) or not item or item != item.strip():
            raise ModeOptionError(
                f"{option} takes dotted module names or globs such as 'lm_head' or "
                f"'blocks.*.attn'; got {item!r}."
            )
    return tuple(sorted(set(items)))


def match_module(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that selects module ``name`` (or one of its parents), or None.

    The root module (name ``""``) is selected by no pattern.
    """
    if not name:
        return None
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        glob = not _GLOB_CHARS.isdisjoint(pattern)
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) if glob else prefix == pattern:
                return pattern
    return None


def closest_name(pattern: str, names: Iterable[str]) -> str | None:
    """The module name closest to a pattern that matched nothing (for "did you mean")."""
    close = difflib.get_close_matches(pattern, list(names), n=1, cutoff=0.6)
    return close[0] if close else None
