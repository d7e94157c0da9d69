"""``mixprec bench``: train a small built-in GPT under every installed mode, side by side.

One idea per module: ``cli`` (arguments, exit status), ``plan`` (which modes run and
how), ``model`` (the GPT and the synthetic task), ``run`` (interleaved training and
measurement), ``memory`` (exact byte counts, step peaks), ``columns`` (the table's
columns, as data) and ``report`` (table, JSON, plot, progress bars). ``mixprec._cli``
needs only :func:`add_arguments` and :func:`run`.

``mixprec._bench.run`` the attribute is that entry point, the command; the training
engine is the submodule of the same name: import from it with
``from mixprec._bench.run import run_bench``.
"""

from __future__ import annotations

from .cli import add_arguments, run

__all__ = ["add_arguments", "run"]
