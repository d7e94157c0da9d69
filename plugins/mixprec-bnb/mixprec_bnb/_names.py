"""Module selection by dotted name (prefixes or globs) and by type."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable

__all__ = ["closest_name", "match_name", "normalize_patterns"]

_GLOB_CHARS = frozenset("*?[")


def normalize_patterns(patterns: str | Iterable[str], option: str) -> tuple[str, ...]:
    """Turn a string or iterable of strings into a sorted tuple, checking each entry."""
    from mixprec.exceptions import ModeOptionError

    items = [patterns] if isinstance(patterns, str) else list(patterns)
    for item in items:
        if not isinstance(item, str) or not item or item != item.strip():
            raise ModeOptionError(
                f"{option} takes dotted module names or globs such as 'lm_head' or "
                f"'blocks.*.attn'; got {item!r}."
            )
    return tuple(sorted(set(items)))


def match_name(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that selects module ``name``, or None.

    A pattern selects a module when it equals the module's dotted name or the
    name of one of its parents (``"lm_head"`` selects ``lm_head`` and everything
    inside it, not ``lm_head2``); a pattern with ``*``, ``?`` or ``[`` is a glob
    matched the same way (``"blocks.*.attn"``; ``*`` also crosses dots).
    """
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))] if name else [""]
    for pattern in patterns:
        glob = not _GLOB_CHARS.isdisjoint(pattern)
        for prefix in prefixes:
            if (fnmatch.fnmatchcase(prefix, pattern) if glob else prefix == pattern):
                return pattern
    return None


def closest_name(pattern: str, names: Iterable[str]) -> str | None:
    """The module name closest to a pattern that matched nothing (for "did you mean")."""
    close = difflib.get_close_matches(pattern, list(names), n=1, cutoff=0.6)
    return close[0] if close else None
