"""The mode-string grammar, one for ``wrap``, the registry and ``mixprec bench``.

::

    mode-string := part ("+" part)*          "bf16-true[master_weights=true]+adamw8bit"
    part        := name ["[" option ("," option)* "]"]
    name        := [a-z0-9][a-z0-9._-]*
    option      := key "=" value             key: a Python identifier

A value is a Python literal (``1024``, ``2.0**16`` is not one, ``'bf16'``,
``('lm_head',)``, ``None``), ``true``/``false`` in any case, or else the bare text
(``dtype=bf16``). A comma list of mode strings (``--modes``) splits on commas
outside brackets.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

from .exceptions import ModeSyntaxError

__all__ = ["NAME_RE", "ModePart", "format_part", "parse_mode_string", "split_mode_list"]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_PART = re.compile(r"^(?P<name>[^\[\]+]*)(?:\[(?P<opts>[^\[\]]*)\])?$")
_HINT = "write lower-case mode names joined by '+', such as 'bf16-true+adamw8bit'"


@dataclass(frozen=True)
class ModePart:
    """One ``name[key=value,…]`` of a mode string."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_mode_string(text: str) -> list[ModePart]:
    """``"bf16-true[master_weights=true]+adamw8bit"`` -> its parts, options parsed.

    :raises mixprec.exceptions.ModeSyntaxError: the text does not follow the grammar.
    """
    stripped = text.strip()
    if not stripped:
        raise ModeSyntaxError("The mode string is empty; pass a mode such as 'bf16-mixed'.",
                              spec=text)
    parts = []
    for token in _split(stripped, "+"):
        match = _PART.match(token.strip())
        name = match["name"].strip() if match else ""
        if match is None or not NAME_RE.match(name):
            what = "an empty part" if not token.strip() else f"the part {token.strip()!r}"
            raise ModeSyntaxError(f"Mode string {text!r} has {what}; {_HINT}, options in "
                                  "brackets: 'bf16-true[master_weights=true]'.", spec=text)
        parts.append(ModePart(name, _options(text, match["opts"] or "")))
    return parts


def split_mode_list(text: str) -> list[str]:
    """Split a comma-separated list of mode strings on commas outside brackets."""
    return [p.strip() for p in _split(text, ",") if p.strip()]


def format_part(name: str, options: dict[str, Any]) -> str:
    """The inverse of one part of :func:`parse_mode_string`: ``bf16-true[master_weights=True]``."""
    if not options:
        return name
    return f"{name}[{','.join(f'{k}={v!r}' if isinstance(v, str) else f'{k}={v}' for k, v in options.items())}]"


def _split(text: str, sep: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _options(text: str, body: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in _split(body, ","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModeSyntaxError(
                f"Cannot read the options of {text!r}: {item!r} is not key=value; write "
                "e.g. 'bf16-true[master_weights=true]'.", spec=text)
        if key in options:
            raise ModeSyntaxError(f"Mode string {text!r} gives option {key!r} twice.", spec=text)
        options[key] = _value(value.strip())
    return options


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
