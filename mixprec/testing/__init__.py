"""A conformance kit for mode authors: does a mode keep mixprec's contracts?

Opt in from the top-level ``conftest.py`` of a plugin's tests (the kit is never
loaded into other pytest runs; there is no ``pytest11`` entry point)::

    pytest_plugins = ["mixprec.testing"]

and subclass :class:`ModeConformance` in a test module::

    from mixprec.testing import ModeConformance

    class TestMyMode(ModeConformance):
        mode = "my-mode"              # or a callable returning a mode object
        options = {"group_size": 64}  # options of a string mode

Each inherited ``test_*`` method checks one contract: registration and
summary, atomic ``wrap`` on a failing conversion, no inf/NaN in weights or
optimizer state after an overflowing step, exact checkpoint resume, output
dtypes, the ``init_module`` dtype, ``deepcopy``/``pickle``/``torch.save``, clear
errors on bad options, a cheap entry-point module, ``unwrap``. A broken
contract fails with a :class:`ContractViolation` saying which contract broke
and how to fix it.

Fixtures, once the plugin is opted in: ``mixprec_plugins`` (override it in the
``conftest.py`` with ``{distribution name: plugin module}``: every test then
runs in a fresh registry holding the core modes and those plugins),
``mixprec_registry`` (that fresh registry, in use for the test; unregistered
after it, also on failure) and ``register_mixprec_plugin`` (register one more
plugin object into it for one test). Tests marked ``gpu`` are skipped where
torch sees no CUDA device.

Helpers for a plugin's own tests: :func:`seeded` (a model with the same weights
every call), :func:`train_steps` (the training loop), :func:`checkpoint_roundtrip`
(``torch.save``/``torch.load(weights_only=True)``), :func:`wrap_quietly`
(``wrap`` without expected :class:`mixprec.MixprecWarning` s) and
:func:`assert_state_equal` (state dicts equal bit for bit, with a readable diff).
A mode that takes ``ignore_modules`` tests mixprec's one rule for it with
:data:`IGNORE_MODULES_CASES` on :func:`ignore_modules_model`, checked with
:func:`assert_ignore_modules_rule`.

The kit raises its own messages, so pytest need not rewrite its asserts
(PYTEST_DONT_REWRITE; this also keeps pytest quiet when the module was imported
before the plugin was loaded).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from ._contracts import CONTRACTS, ContractViolation
from ._fixtures import _use_mixprec_plugins as _use_mixprec_plugins
from ._fixtures import mixprec_plugins, mixprec_registry, register_mixprec_plugin
from ._fixtures import pytest_collection_modifyitems as pytest_collection_modifyitems
from ._fixtures import pytest_configure as pytest_configure
from ._helpers import ConformanceNet
from ._rules import (
    IGNORE_MODULES_CASES,
    IGNORE_MODULES_LINEARS,
    assert_ignore_modules_rule,
    ignore_modules_model,
)
from ._tools import (
    assert_state_equal,
    checkpoint_roundtrip,
    first_party_modes,
    seeded,
    train_steps,
    wrap_quietly,
)
from ._train import TrainChecks
from ._wrap import WrapChecks

# pytest finds the fixtures and hooks among this module's names (it is the plugin
# named in pytest_plugins); the hooks and the autouse fixture are not API.

__all__ = [
    "CONTRACTS",
    "IGNORE_MODULES_CASES",
    "IGNORE_MODULES_LINEARS",
    "ConformanceNet",
    "ContractViolation",
    "ModeConformance",
    "assert_ignore_modules_rule",
    "assert_state_equal",
    "checkpoint_roundtrip",
    "first_party_modes",
    "ignore_modules_model",
    "mixprec_plugins",
    "mixprec_registry",
    "register_mixprec_plugin",
    "seeded",
    "train_steps",
    "wrap_quietly",
]


# -- the conformance suite -------------------------------------------------------------------


class ModeConformance(WrapChecks, TrainChecks):
    """Subclass as ``TestSomething`` to run every contract check against one mode.

    Configure with class attributes (``mode``, ``options``, ``plugin``,
    ``model_factory``, ``trainable``, ``exact_resume``, ``output_dtype`` …, see
    docs/plugin-guide.md); override ``make_model``, ``make_batch``,
    ``compute_loss`` or ``make_optimizer`` when the mode needs another model or
    data. Each ``test_*`` method checks one contract and raises a
    :class:`ContractViolation` naming it and the fix.
    """
