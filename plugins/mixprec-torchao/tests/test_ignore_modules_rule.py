"""``ignore_modules`` follows mixprec's one rule: the conformance kit's table
(``mixprec.testing.IGNORE_MODULES_CASES``), as in every first-party plugin."""

from __future__ import annotations

import pytest
from mixprec_torchao import Float8Training

import mixprec
from mixprec.testing import IGNORE_MODULES_CASES as CASES
from mixprec.testing import assert_ignore_modules_rule, ignore_modules_model


@pytest.mark.filterwarnings("ignore::mixprec.MixprecWarning")  # names the layers kept
@pytest.mark.parametrize(("patterns", "selected"), CASES, ids=[str(c[0]) for c in CASES])
def test_the_mode_excludes_what_match_module_selects(patterns: list[str], selected: set[str]) -> None:
    mode = Float8Training("tensorwise", ignore_modules=patterns)
    wrapped = mixprec.wrap(ignore_modules_model(), None, mode)
    assert_ignore_modules_rule(wrapped, patterns, selected,
                               lambda m: type(m).__name__ == "Float8Linear")
