"""mixprec's one ``ignore_modules`` rule: the kit's table, and which entries match nothing."""

from __future__ import annotations

import pytest
import torch

from mixprec.testing import IGNORE_MODULES_CASES, IGNORE_MODULES_LINEARS, ignore_modules_model
from mixprec.utils import match_module, unmatched_patterns

CASES = IGNORE_MODULES_CASES


def test_the_model_has_the_layers_the_cases_name() -> None:
    model = ignore_modules_model()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(names) == sorted(IGNORE_MODULES_LINEARS)


@pytest.mark.parametrize(("patterns", "selected"), CASES, ids=[str(c[0]) for c in CASES])
def test_match_module_selects_the_table(patterns: list[str], selected: set[str]) -> None:
    assert {n for n in IGNORE_MODULES_LINEARS if match_module(n, patterns)} == selected


@pytest.mark.parametrize(("patterns", "selected"), CASES, ids=[str(c[0]) for c in CASES])
def test_every_entry_of_the_table_matches_a_module(patterns: list[str], selected: set[str]) -> None:
    names = [n for n, _ in ignore_modules_model().named_modules()]
    assert unmatched_patterns(names, patterns) == []


def test_unmatched_patterns_tries_each_entry_on_its_own() -> None:
    names = ["", "base_model", "base_model.model", "base_model.model.lm_head",
             "base_model.model.fc"]
    # the first entry selects lm_head; the second selects it too and is matched as well
    assert unmatched_patterns(names, ["lm_head", "base_model.model.lm_head", "lm_hea",
                                      "*.fc", "head"]) == ["lm_hea", "head"]
    assert unmatched_patterns([""], ["anything"]) == ["anything"]  # the root is never selected
