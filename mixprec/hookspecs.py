"""Hook specifications: the contract between mixprec and its plugins.

A plugin is a module (or object) with functions marked ``@mixprec.hookimpl``
whose names match the specs below. It is found through the ``mixprec``
entry-point group, the entry-point name being the distribution name::

    [project.entry-points.mixprec]
    mixprec-bnb = "mixprec_bnb.plugin"

The entry-point module must import only ``mixprec`` (and the standard
library): plugins are imported only when a mode name outside the core is looked
up or every mode is listed (``mixprec modes``), and a heavy library should load
only when one of its modes is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ._interface import ModeSpec

PROJECT_NAME = "mixprec"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def mixprec_modes() -> list[ModeSpec]:  # type: ignore[empty-body]
    """Return the modes this plugin provides.

    Contract:

    - Return a list of :class:`mixprec.ModeSpec`, one per mode name. A name is
      lower case, starts with a letter or digit and holds only letters,
      digits, ``.``, ``_`` and ``-`` (``+`` joins modes in a mode string).
    - ``ModeSpec.kind`` is ``"precision"`` for a mode that changes the model
      (casting, layer swaps, autocast, loss scaling) and ``"optimizer"`` for one
      that replaces the optimizer (``"bf16-true+adamw8bit"``).
    - ``ModeSpec.factory`` builds the mode object from keyword options; it is
      called only when the mode is used, so it may import the plugin's heavy
      library. The hook itself must be cheap and must not import it.
    - A name another distribution already provides is a conflict: the registry
      refuses that name (naming both distributions) and keeps the others.
    - Raising from this hook marks the plugin as broken (``mixprec modes``
      shows the reason); other plugins keep working.
    """
