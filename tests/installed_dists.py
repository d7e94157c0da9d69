"""Really installed distributions for the plugin-loading tests.

:class:`Site` writes a ``*.dist-info`` directory (``METADATA`` and
``entry_points.txt``) and the distribution's modules into a temporary folder and
puts that folder first on ``sys.path``: ``importlib.metadata`` then finds the
distribution exactly as one installed by pip, and importing its entry point runs
its modules for real. Each distribution gets its own folder, so the order of
``install`` calls is the order in which ``importlib.metadata`` lists them (last
installed first), as the order of ``sys.path`` decides it for real installs.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

__all__ = ["Site", "plugin_source"]


class Site:
    """Folders on ``sys.path`` holding distributions; their modules leave
    ``sys.modules`` when the test ends (``sys.path`` is restored by monkeypatch)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.modules: list[str] = []

    def install(
        self, name: str, *, version: str = "1.0", entry_points: dict[str, str],
        modules: dict[str, str] | None = None,
    ) -> None:
        """Install distribution ``name`` with ``entry_points`` in the ``mixprec``
        group (entry-point name -> module) and ``modules`` (module name -> source)."""
        folder = self.root / f"site-{len(list(self.root.iterdir()))}"
        folder.mkdir()
        info = folder / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(
            "[mixprec]\n" + "".join(f"{ep} = {target}\n" for ep, target in entry_points.items()))
        for module, source in (modules or {}).items():
            (folder / f"{module}.py").write_text(textwrap.dedent(source))
            self.modules.append(module)
        self.monkeypatch.syspath_prepend(str(folder))

    def close(self) -> None:
        for module in self.modules:
            sys.modules.pop(module, None)


def plugin_source(*modes: tuple[str, str], summary: str = "", extra: str = "") -> str:
    """The source of an entry-point module providing ``(name, kind)`` modes."""
    lines = ["import mixprec", textwrap.dedent(extra)]
    specs = []
    for index, (mode, kind) in enumerate(modes):
        base = "PrecisionMode" if kind == "precision" else "OptimizerMode"
        lines.append(f"class Mode{index}(mixprec.{base}):\n    name = {mode!r}\n")
        specs.append(f"mixprec.ModeSpec({mode!r}, Mode{index}, {summary or mode!r}, kind={kind!r})")
    lines.append(f"@mixprec.hookimpl\ndef mixprec_modes():\n    return [{', '.join(specs)}]\n")
    return "\n".join(lines)
