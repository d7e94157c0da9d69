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

Fixtures, once the plugin is opted in: ``mixprec_registry`` (a fresh registry
with only the core modes, in use for the test) and ``register_mixprec_plugin``
(register a plugin object into it; unregistered after the test, also on failure).

The kit raises its own messages, so pytest need not rewrite its asserts
(PYTEST_DONT_REWRITE; this also keeps pytest quiet when the module was imported
before the plugin was loaded).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from ._contracts import CONTRACTS, ContractViolation
from ._fixtures import mixprec_registry, register_mixprec_plugin
from ._helpers import ConformanceNet
from ._train import TrainChecks
from ._wrap import WrapChecks

__all__ = [
    "CONTRACTS",
    "ConformanceNet",
    "ContractViolation",
    "ModeConformance",
    "mixprec_registry",
    "register_mixprec_plugin",
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
