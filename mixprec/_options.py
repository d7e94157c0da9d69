"""Typed mode options: a boolean is a boolean, a number is in its range.

Options come from keywords (``wrap(..., master_weights=True)``) and from mode
strings (``"bf16-true[master_weights=true]"``, where the grammar already reads
``true``/``false``). A truthy string such as ``"no"`` must never switch a feature
on, so anything but a real ``bool`` is refused with the option's name.
"""

from __future__ import annotations

import math
from typing import Any

from .exceptions import ModeOptionError

__all__ = ["check_bool", "check_number"]


def check_bool(value: Any, option: str) -> bool:
    """``value`` if it is a ``bool``; otherwise a :class:`ModeOptionError`."""
    if isinstance(value, bool):
        return value
    raise ModeOptionError(
        f"Option {option} takes True or False, got {value!r}; pass a bool (in a mode "
        f"string: {option}=true or {option}=false)."
    )


def check_number(
    value: Any, option: str, *, minimum: float | None = None, maximum: float | None = None,
    integer: bool = False, above: bool = False,
) -> Any:
    """``value`` if it is a finite number (an ``int`` where ``integer``) in range.

    :param minimum: the smallest valid value (exclusive where ``above``).
    :param maximum: the largest valid value.
    :raises mixprec.exceptions.ModeOptionError: naming the option and the valid range.
    """
    kind = "an integer" if integer else "a number"
    low = "" if minimum is None else f"{'>' if above else '>='} {minimum:g}"
    high = "" if maximum is None else f"<= {maximum:g}"
    valid = f"{kind}{' ' + low if low else ''}{' and ' + high if low and high else high and ' ' + high}"
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value) and (not integer or int(value) == value))
    if ok and minimum is not None:
        ok = value > minimum if above else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        raise ModeOptionError(f"Option {option} must be {valid}, got {value!r}.")
    return int(value) if integer else value
