"""Warnings that point at the user's line, however deep in mixprec or a plugin
they are raised."""

from __future__ import annotations

import sys
import warnings

__all__ = ["warn_user"]


def warn_user(message: str, category: type[Warning] | None = None, *,
              internal: tuple[str, ...] = ()) -> None:
    """``warnings.warn`` attributed to the first caller outside mixprec and its plugins
    (modules named ``mixprec`` or ``mixprec_*``, and ``internal`` module prefixes), so
    the warning shows the user's ``wrap()`` or ``step()`` line whatever the call depth.

    :param category: default :class:`mixprec.MixprecWarning`.
    """
    if category is None:
        from .exceptions import MixprecWarning

        category = MixprecWarning
    level, frame = 2, sys._getframe(1)  # stacklevel 2: warn_user's caller
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        top = module.split(".", 1)[0]
        ours = top == "mixprec" or top.startswith("mixprec_") or (
            bool(internal) and module.startswith(internal))
        if not ours and module not in ("contextlib", "functools"):
            break
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)
