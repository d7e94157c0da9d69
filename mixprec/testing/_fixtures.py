"""The kit's pytest fixtures and hooks, active once a plugin's tests opt in with
``pytest_plugins = ["mixprec.testing"]`` (see :mod:`mixprec.testing`).

A plugin's ``conftest.py`` names its plugin once, by overriding
:func:`mixprec_plugins`; every test then runs with a fresh registry holding the
core modes and that plugin, registered by hand (never the installed entry
points) and unregistered after the test, also when it fails. Tests marked
``gpu`` are skipped where torch sees no CUDA device.
(PYTEST_DONT_REWRITE: the kit raises its own messages.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import torch

import mixprec

__all__ = ["mixprec_plugins", "mixprec_registry", "register_mixprec_plugin"]

_GPU_MARKER = "gpu: needs a CUDA GPU (mixprec.testing skips it where torch sees none)"


@pytest.fixture
def mixprec_plugins() -> Mapping[str, object]:
    """The plugins under test, ``{distribution name: plugin object}`` (the object
    is usually the module holding the ``mixprec_modes`` hookimpl). None by
    default; a plugin's ``conftest.py`` overrides this fixture to name its own,
    and every test then runs with them in :func:`mixprec_registry`."""
    return {}


@pytest.fixture
def mixprec_registry(mixprec_plugins: Mapping[str, object]) -> Iterator[mixprec.Registry]:
    """A fresh registry, in use for the test (``mixprec.registry()`` returns it),
    holding the core modes and :func:`mixprec_plugins`, registered by hand under
    their distribution names; they are unregistered after the test."""
    with mixprec.use_registry(mixprec.Registry(entry_points=False)) as reg:
        names: list[str] = []
        try:
            for distribution, plugin in mixprec_plugins.items():
                names.append(reg.register(plugin, name=distribution, distribution=distribution))
            yield reg
        finally:
            for name in reversed(names):
                reg.unregister(name)


@pytest.fixture(autouse=True)
def _use_mixprec_plugins(request: pytest.FixtureRequest,
                         mixprec_plugins: Mapping[str, object]) -> None:
    """Where :func:`mixprec_plugins` names plugins, every test runs in
    :func:`mixprec_registry`, requested or not."""
    if mixprec_plugins:
        request.getfixturevalue("mixprec_registry")


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


def pytest_configure(config: pytest.Config) -> None:
    """Declare the ``gpu`` marker (a plugin may declare it too, with its own words)."""
    config.addinivalue_line("markers", _GPU_MARKER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``gpu`` where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA GPU, and torch sees none")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
