"""``ignore_modules`` follows mixprec's one rule: the conformance kit's table
(``mixprec.testing.IGNORE_MODULES_CASES``), as in every first-party plugin."""

from __future__ import annotations

import warnings

import pytest
from _te_testing import CpuTestMode

import mixprec
from mixprec.testing import IGNORE_MODULES_CASES as CASES
from mixprec.testing import assert_ignore_modules_rule, ignore_modules_model


@pytest.mark.parametrize(("patterns", "selected"), CASES, ids=[str(c[0]) for c in CASES])
def test_the_mode_excludes_what_match_module_selects(te, patterns: list[str], selected: set[str]) -> None:
    """On the CPU with the Transformer Engine stand-in (the layer decisions are pure torch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", mixprec.MixprecWarning)  # every pattern matches, all fit
        wrapped = mixprec.wrap(ignore_modules_model(), None, CpuTestMode("bf16", ignore_modules=patterns))
    assert_ignore_modules_rule(wrapped, patterns, selected, lambda m: type(m) is te.Linear)
