"""``ignore_modules`` follows mixprec's one rule: the conformance kit's table
(``mixprec.testing.IGNORE_MODULES_CASES``), as in every first-party plugin."""

from __future__ import annotations

import pytest
from mixprec_bnb import BitsandbytesMode, QuantLinear4bit

import mixprec
from mixprec.testing import IGNORE_MODULES_CASES as CASES
from mixprec.testing import assert_ignore_modules_rule, ignore_modules_model


@pytest.mark.filterwarnings("ignore::mixprec.MixprecWarning")  # weights frozen by quantization
@pytest.mark.parametrize(("patterns", "selected"), CASES, ids=[str(c[0]) for c in CASES])
def test_the_mode_excludes_what_match_module_selects(patterns: list[str], selected: set[str]) -> None:
    mode = BitsandbytesMode("nf4", ignore_modules=patterns, quantize_lm_head=True)  # the rule alone
    wrapped = mixprec.wrap(ignore_modules_model(), None, mode)
    assert_ignore_modules_rule(wrapped, patterns, selected,
                               lambda m: isinstance(m, QuantLinear4bit))
