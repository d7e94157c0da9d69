"""The contracts the conformance kit checks, and the failure that names one.

Every check of :class:`mixprec.testing.ModeConformance` fails with a
:class:`ContractViolation` carrying one of the names in :data:`CONTRACTS`, so a
plugin author sees which promise broke and where it is stated.
(PYTEST_DONT_REWRITE: the kit raises its own messages.)
"""

from __future__ import annotations

import pytest

__all__ = ["CONTRACTS", "ContractViolation"]

#: Contract names used in :class:`ContractViolation`, each with a link to the
#: heading of mixprec's plugin guide that states it ("Keeping mixprec's contracts").
CONTRACTS: dict[str, str] = {
    "registration": "docs/plugin-guide.md#registration",
    "atomic wrap": "docs/plugin-guide.md#atomic-wrap",
    "no poisoned weights": "docs/plugin-guide.md#no-poisoned-weights",
    "exact resume": "docs/plugin-guide.md#exact-resume",
    "clear errors": "docs/plugin-guide.md#clear-errors",
    "honest conversions": "docs/plugin-guide.md#honest-conversions",
    "output dtype": "docs/plugin-guide.md#output-dtype",
    "init_module": "docs/plugin-guide.md#init_module",
    "copies": "docs/plugin-guide.md#copies",
    "training": "docs/plugin-guide.md#training",
    "examined": "docs/plugin-guide.md#examined",
    "unwrap": "docs/plugin-guide.md#unwrap",
}


class ContractViolation(pytest.fail.Exception):  # type: ignore[name-defined]
    """A mode broke one of mixprec's contracts (a pytest failure).

    pytest shows only the message (which says what broke and how to fix it),
    unless the violation was caused by an exception in the mode, whose traceback
    is then shown too.

    :ivar contract: the contract's name (a key of :data:`CONTRACTS`).
    :ivar problem: what was observed.
    :ivar fix: what the mode's author should change.
    :ivar mode: the mode under test, as given to ``wrap``.
    """

    def __init__(
        self, contract: str, problem: str, fix: str, *, mode: str = "",
        cause: BaseException | None = None,
    ) -> None:
        self.contract = contract
        self.problem = problem
        self.fix = fix
        self.mode = mode
        by = f" by mode {mode!r}" if mode else ""
        message = (f"mixprec contract '{contract}' ({CONTRACTS.get(contract, '')}) broken{by}: "
                   f"{problem.rstrip()} Fix: {fix.rstrip()}")
        super().__init__(message, pytrace=cause is not None)


ContractViolation.__module__ = "mixprec.testing"  # where users import it from
