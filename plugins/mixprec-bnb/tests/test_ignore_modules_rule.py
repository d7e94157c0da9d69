"""``ignore_modules`` follows mixprec's one rule (``mixprec.utils.match_module``).

mixprec-bnb, mixprec-te and mixprec-torchao each carry this test with the same
model and the same patterns, so the three plugins leave exactly the same layers
alone for the same ``ignore_modules``. (The plugins once kept their own matchers,
and mixprec-te's missed a module inside a glob-matched parent: with
``"blocks.*.attn"`` it converted ``blocks.0.attn.q``.)
"""

from __future__ import annotations

import pytest
import torch
from mixprec_bnb import BitsandbytesMode, QuantLinear4bit

import mixprec
from mixprec.utils import match_module

#: The Linear layers of :func:`build_model`, by dotted name.
LINEARS = ("blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.mlp.up", "blocks.1.attn.q",
           "lm_head", "lm_head2")

#: (ignore_modules, the Linear layers they select): the same table in each plugin's test.
CASES = [
    (["blocks.0.attn.q"], {"blocks.0.attn.q"}),  # an exact name
    (["blocks.0.attn"], {"blocks.0.attn.q", "blocks.0.attn.k"}),  # a parent
    (["blocks.*.attn"], {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.1.attn.q"}),  # glob, parent
    (["*.q"], {"blocks.0.attn.q", "blocks.1.attn.q"}),  # a glob over leaves; * crosses dots
    (["blocks.?.attn.[k]"], {"blocks.0.attn.k"}),  # ? and [ make a glob too
    (["lm_head"], {"lm_head"}),  # a name, not a prefix: not lm_head2
    (["blocks.1", "lm_head2"], {"blocks.1.attn.q", "lm_head2"}),
    # names are matched from the end as well, by whole parts (peft's base_model.model.lm_head)
    (["attn.q"], {"blocks.0.attn.q", "blocks.1.attn.q"}),  # a module's trailing parts
    (["0.attn"], {"blocks.0.attn.q", "blocks.0.attn.k"}),  # a parent's trailing parts
    (["mlp.u[p]"], {"blocks.0.mlp.up"}),  # a glob, from the end too
]


def build_model() -> torch.nn.Module:
    """blocks.0.attn.{q,k}, blocks.0.mlp.up, blocks.1.attn.q, lm_head, lm_head2: 32x32
    ``nn.Linear`` layers (sizes every plugin converts)."""
    torch.manual_seed(0)

    def linears(*names: str) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({n: torch.nn.Linear(32, 32) for n in names})

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([
        torch.nn.ModuleDict({"attn": linears("q", "k"), "mlp": linears("up")}),
        torch.nn.ModuleDict({"attn": linears("q")}),
    ])
    model.lm_head = torch.nn.Linear(32, 32)
    model.lm_head2 = torch.nn.Linear(32, 32)
    return model


def test_the_model_has_the_layers_the_cases_name() -> None:
    names = [n for n, m in build_model().named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(names) == sorted(LINEARS)


@pytest.mark.parametrize(("patterns", "selected"), CASES, ids=[str(c[0]) for c in CASES])
def test_match_module_selects_the_table(patterns: list[str], selected: set[str]) -> None:
    assert {n for n in LINEARS if match_module(n, patterns)} == selected


@pytest.mark.filterwarnings("ignore::mixprec.MixprecWarning")  # weights frozen by quantization
@pytest.mark.parametrize(("patterns", "selected"), CASES, ids=[str(c[0]) for c in CASES])
def test_the_mode_excludes_what_match_module_selects(patterns: list[str], selected: set[str]) -> None:
    mode = BitsandbytesMode("nf4", ignore_modules=patterns, quantize_lm_head=True)  # the rule alone
    wrapped = mixprec.wrap(build_model(), None, mode)
    quantized = {n for n, m in wrapped.named_modules() if isinstance(m, QuantLinear4bit)}
    assert quantized == set(LINEARS) - selected
    kept = {n for n, m in wrapped.named_modules() if type(m) is torch.nn.Linear}
    assert kept == {n for n in LINEARS if match_module(n, patterns)} == selected
