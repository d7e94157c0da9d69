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

import warnings

import pytest
import torch
from _te_testing import CpuTestMode

import mixprec
from mixprec.testing import IGNORE_MODULES_CASES, IGNORE_MODULES_LINEARS, ignore_modules_model
from mixprec.utils import match_module

CASES = IGNORE_MODULES_CASES
LINEARS = IGNORE_MODULES_LINEARS
build_model = ignore_modules_model


@pytest.mark.parametrize(("patterns", "selected"), CASES, ids=[str(c[0]) for c in CASES])
def test_the_mode_excludes_what_match_module_selects(te, patterns: list[str], selected: set[str]) -> None:
    """On the CPU with the Transformer Engine stand-in (the layer decisions are pure torch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", mixprec.MixprecWarning)  # every pattern matches, all fit
        wrapped = mixprec.wrap(build_model(), None, CpuTestMode("bf16", ignore_modules=patterns))
    assert {n for n, m in wrapped.named_modules() if type(m) is te.Linear} == set(LINEARS) - selected
    kept = {n for n, m in wrapped.named_modules() if type(m) is torch.nn.Linear}
    assert kept == {n for n in LINEARS if match_module(n, patterns)} == selected
