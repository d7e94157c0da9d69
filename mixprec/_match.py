"""Selecting modules by dotted name: the one ``ignore_modules`` rule of every mode.

A pattern selects a module when it equals the module's dotted name or the name
of one of its parents (``"lm_head"`` selects ``lm_head`` and everything inside
it, not ``lm_head2``), or when that name ends with ``.`` + the pattern: names are
matched from the end as well, so ``"lm_head"`` also selects
``base_model.model.lm_head`` (the name peft gives it) and ``"attn.q"`` selects
``blocks.0.attn.q`` — whole name parts only (``"head"`` selects neither
``lm_head`` nor ``lm_head.x``). A pattern holding ``*``, ``?`` or ``[`` is an
``fnmatch`` glob matched the same way (``"blocks.*.attn"`` selects
``blocks.0.attn``, ``blocks.0.attn.q`` and ``model.blocks.0.attn``; ``*`` also
crosses dots).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable

from .exceptions import ModeOptionError

__all__ = ["closest_name", "match_module", "normalize_patterns", "unmatched_patterns"]

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

    A pattern selects a name that equals it or ends with ``.`` + it (whole name parts:
    ``"lm_head"`` selects ``lm_head`` and ``base_model.model.lm_head``, not
    ``lm_head2``), and everything inside such a module; globs (``*``, ``?``, ``[``)
    are matched against the same names. The root module (name ``""``) is selected by
    no pattern.
    """
    if not name:
        return None
    parts = name.split(".")
    # The module and each of its parents, each also without its leading parts: every
    # run of whole parts of ``name``.
    candidates = [".".join(parts[start:end])
                  for end in range(1, len(parts) + 1) for start in range(end)]
    for pattern in patterns:
        if not _GLOB_CHARS.isdisjoint(pattern):
            if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
                return pattern
        elif pattern in candidates:
            return pattern
    return None


def unmatched_patterns(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The patterns that select none of the module ``names``, in their order.

    Every pattern is tried on its own: one that selects a module another pattern also
    selects is matched (``["lm_head", "base_model.model.lm_head"]`` on a peft model
    matches both), which :func:`match_module`, returning the first, cannot say.
    """
    names = [n for n in names if n]
    return [p for p in patterns if not any(match_module(n, (p,)) for n in names)]


def closest_name(pattern: str, names: Iterable[str]) -> str | None:
    """The module name closest to a pattern that matched nothing (for "did you mean")."""
    close = difflib.get_close_matches(pattern, list(names), n=1, cutoff=0.6)
    return close[0] if close else None
