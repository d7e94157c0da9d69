"""What is particular to this plugin's tests: the plugin under test and the
stand-ins for Transformer Engine (a CPU-only machine has none; see
_te_standin.py). The fresh registry per test, the ``gpu`` skip and the generic
helpers come from mixprec's kit (``mixprec.testing``)."""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import _te_standin
import pytest
from _te_testing import Net
from mixprec_te import plugin as te_plugin

import mixprec
from mixprec.testing import seeded

pytest_plugins = ["mixprec.testing"]  # the conformance kit, opt-in


def _real_te_installed() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


REAL_TE = _real_te_installed()


def _install(monkeypatch: pytest.MonkeyPatch, legacy: bool) -> Any:
    if REAL_TE:
        pytest.skip("the real Transformer Engine is installed; stand-in tests run on CPU machines")
    for name, module in _te_standin.build(legacy=legacy).items():
        monkeypatch.setitem(sys.modules, name, module)
    _te_standin.reset_state()
    return sys.modules["transformer_engine.pytorch"]


@pytest.fixture
def te(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The TE 2.x stand-in as ``transformer_engine.pytorch`` (see _te_standin.py)."""
    yield _install(monkeypatch, legacy=False)
    _te_standin.reset_state()


@pytest.fixture
def te_legacy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The TE 1.x-style stand-in (fp8_autocast, fp8.check_fp8_support, no RMSNorm)."""
    yield _install(monkeypatch, legacy=True)
    _te_standin.reset_state()


@pytest.fixture
def no_te() -> None:
    """Transformer Engine really is not installed (true on CPU machines)."""
    if REAL_TE:
        pytest.skip("Transformer Engine is installed here")
    assert "transformer_engine" not in sys.modules


class _BrokenFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name.split(".")[0] == "transformer_engine":
            raise OSError("libcuda.so.1: cannot open shared object file: No such file or directory")
        return None


@pytest.fixture
def broken_te(monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed TE whose CUDA library fails to load (TE wheels on a CPU machine)."""
    if REAL_TE:
        pytest.skip("Transformer Engine is installed here")
    monkeypatch.setattr(sys, "meta_path", [_BrokenFinder(), *sys.meta_path])


@pytest.fixture
def mixprec_plugins() -> Mapping[str, object]:
    """Every test runs in a fresh registry: the core modes and this plugin, by hand."""
    return {"mixprec-te": te_plugin}


@pytest.fixture
def fresh_registry(mixprec_registry: mixprec.Registry) -> mixprec.Registry:
    """The kit's registry of the test (these tests name it so)."""
    return mixprec_registry


@pytest.fixture
def net() -> Net:
    return seeded(Net)
