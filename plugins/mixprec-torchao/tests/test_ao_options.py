"""Typed options: a boolean option takes True/False only, a number must be in its range
and the error says the range (``mixprec.utils.check_bool`` / ``check_number``)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_mlp
from mixprec_torchao import Float8Training, LowBitAdamW

import mixprec
from mixprec.exceptions import ModeOptionError

BOOL = r"takes True or False, got {!r}; pass a bool"

CASES = [
    (Float8Training, "tensorwise", {"emulate": "no"}, r"Option emulate " + BOOL.format("no")),
    (Float8Training, "rowwise", {"emulate": 1}, r"Option emulate " + BOOL.format(1)),
    (Float8Training, "tensorwise", {"pad_inner_dim": "false"},
     r"Option pad_inner_dim " + BOOL.format("false")),
    (Float8Training, "tensorwise", {"keep_output_dtype": "yes"},
     r"Option keep_output_dtype " + BOOL.format("yes")),
    (Float8Training, "tensorwise", {"param_dtype": "bf16", "master_weights": "no"},
     r"Option master_weights " + BOOL.format("no")),
    (Float8Training, "tensorwise", {"master_weights": None},
     r"Option master_weights " + BOOL.format(None)),
    (LowBitAdamW, "8bit", {"block_size": 0}, r"Option block_size must be an integer > 0, got 0\."),
    (LowBitAdamW, "8bit", {"block_size": "256"},
     r"Option block_size must be an integer > 0, got '256'\."),
    (LowBitAdamW, "fp8", {"block_size": 128.5},
     r"Option block_size must be an integer > 0, got 128\.5\."),
    (LowBitAdamW, "4bit", {"block_size": True},
     r"Option block_size must be an integer > 0, got True\."),
    (LowBitAdamW, "4bit", {"block_size": 127}, r"block_size must be even for ao-adamw4bit"),
    (LowBitAdamW, "8bit", {"bf16_stochastic_round": "no"},
     r"Option bf16_stochastic_round " + BOOL.format("no")),
    (LowBitAdamW, "8bit", {"bf16_stochastic_round": 0},
     r"Option bf16_stochastic_round " + BOOL.format(0)),
]


@pytest.mark.parametrize(("cls", "mode", "options", "message"), CASES,
                         ids=[f"{mode}-{options}" for _, mode, options, _ in CASES])
def test_boolean_and_numeric_options_are_typed(cls, mode, options, message):
    with pytest.raises(ModeOptionError, match=message):
        cls(mode, **options)


@pytest.mark.parametrize(("mode", "options", "message"), [
    ("fp8-tensorwise[emulate=no]", {}, r"Option emulate " + BOOL.format("no")),
    ("fp8-rowwise", {"pad_inner_dim": "False"}, r"Option pad_inner_dim " + BOOL.format("False")),
    ("fp8-rowwise-gw-hp", {"keep_output_dtype": 1},
     r"Option keep_output_dtype " + BOOL.format(1)),
])
def test_string_modes_refuse_untyped_options_before_anything_changes(mode, options, message):
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ModeOptionError, match=message):
        mixprec.wrap(model, opt, mode, **options)
    assert not mixprec.is_wrapped(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_typed_options_take_real_values():
    mode = Float8Training("tensorwise", emulate=True, pad_inner_dim=True, keep_output_dtype=True,
                          param_dtype="bf16", master_weights=True)
    assert mode.options() == {"param_dtype": "bf16", "master_weights": True, "emulate": True,
                              "pad_inner_dim": True, "keep_output_dtype": True}
    assert LowBitAdamW("8bit", block_size=128, bf16_stochastic_round=True).options() == {
        "block_size": 128, "bf16_stochastic_round": True}
    assert LowBitAdamW("4bit", block_size=64.0).block_size == 64
