"""``ignore_modules`` follows mixprec's one rule (``mixprec.utils.match_module``).

Every first-party plugin runs the conformance kit's table
(``mixprec.testing.IGNORE_MODULES_CASES`` on ``ignore_modules_model()``), so the three
plugins leave exactly the same layers alone for the same ``ignore_modules`` and none
says an entry "matches no module" when it selects one. (The plugins once kept their own
matchers: mixprec-te's missed a module inside a glob-matched parent, converting
``blocks.0.attn.q`` with ``"blocks.*.attn"``, and counted only the first entry that
selected a module as used.)
"""

from __future__ import annotations

import pytest
import torch
from mixprec_torchao import Float8Training

import mixprec
from mixprec.testing import IGNORE_MODULES_CASES, IGNORE_MODULES_LINEARS, ignore_modules_model
from mixprec.utils import match_module

CASES = IGNORE_MODULES_CASES
LINEARS = IGNORE_MODULES_LINEARS
build_model = ignore_modules_model


@pytest.mark.filterwarnings("ignore::mixprec.MixprecWarning")  # names the layers kept
@pytest.mark.parametrize(("patterns", "selected"), CASES, ids=[str(c[0]) for c in CASES])
def test_the_mode_excludes_what_match_module_selects(patterns: list[str], selected: set[str]) -> None:
    wrapped = mixprec.wrap(build_model(), None, Float8Training("tensorwise", ignore_modules=patterns))
    fp8 = {n for n, m in wrapped.named_modules() if type(m).__name__ == "Float8Linear"}
    assert fp8 == set(LINEARS) - selected
    kept = {n for n, m in wrapped.named_modules() if type(m) is torch.nn.Linear}
    assert kept == {n for n in LINEARS if match_module(n, patterns)} == selected
