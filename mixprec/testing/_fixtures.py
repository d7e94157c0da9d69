"""The kit's pytest fixtures, active once a plugin's tests opt in with
``pytest_plugins = ["mixprec.testing"]`` (see :mod:`mixprec.testing`).
(PYTEST_DONT_REWRITE: the kit raises its own messages.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mixprec

__all__ = ["mixprec_registry", "register_mixprec_plugin"]


@pytest.fixture
def mixprec_registry() -> Iterator[mixprec.Registry]:
    """A fresh registry holding only the core modes, in use for the test."""
    with mixprec.use_registry(mixprec.Registry(entry_points=False)) as reg:
        yield reg


@pytest.fixture
def register_mixprec_plugin(mixprec_registry: mixprec.Registry) -> Iterator[Callable[..., str]]:
    """``register(plugin, name=None, **kw) -> name``: register a plugin object into
    the test's fresh registry; every plugin is unregistered after the test."""
    names: list[str] = []

    def register(plugin: object, name: str | None = None, **kwargs: Any) -> str:
        registered = mixprec_registry.register(plugin, name=name, **kwargs)
        names.append(registered)
        return registered

    try:
        yield register
    finally:
        for name in reversed(names):
            mixprec_registry.unregister(name)
