"""Typed options: a boolean option takes True/False only, a number must be in its range
and the error says the range (``mixprec.utils.check_bool`` / ``check_number``)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_lm
from mixprec_bnb import BitsandbytesMode, BitsandbytesOptimizer

import mixprec
from mixprec.exceptions import ModeOptionError

BOOL = r"takes True or False, got {!r}; pass a bool"


CASES = [
    (BitsandbytesMode, "int8-training", {"master_weights": "no"},
     r"Option master_weights " + BOOL.format("no")),
    (BitsandbytesMode, "int8-training", {"master_weights": 1},
     r"Option master_weights " + BOOL.format(1)),
    (BitsandbytesMode, "nf4", {"blocksize": "64"},
     r"Option blocksize must be an integer >= 32 and <= 4096, got '64'\."),
    (BitsandbytesMode, "nf4", {"blocksize": True},
     r"Option blocksize must be an integer >= 32 and <= 4096, got True\."),
    (BitsandbytesMode, "nf4", {"blocksize": 8192},
     r"Option blocksize must be an integer >= 32 and <= 4096, got 8192\."),
    (BitsandbytesMode, "nf4", {"blocksize": float("nan")},
     r"Option blocksize must be an integer >= 32 and <= 4096, got nan\."),
    (BitsandbytesMode, "nf4", {"blocksize": 100},
     r"blocksize=100 is not supported by bitsandbytes; use one of 32, 64, 128"),
    (BitsandbytesMode, "nf4", {"keep_output_dtype": "yes"},
     r"Option keep_output_dtype " + BOOL.format("yes")),
    (BitsandbytesMode, "int8", {"keep_output_dtype": 0},
     r"Option keep_output_dtype " + BOOL.format(0)),
    (BitsandbytesOptimizer, "adamw8bit", {"min_8bit_size": -1},
     r"Option min_8bit_size must be an integer >= 0, got -1\."),
    (BitsandbytesOptimizer, "adamw8bit", {"min_8bit_size": 4096.5},
     r"Option min_8bit_size must be an integer >= 0, got 4096\.5\."),
    (BitsandbytesOptimizer, "adamw8bit", {"min_8bit_size": "4096"},
     r"Option min_8bit_size must be an integer >= 0, got '4096'\."),
    (BitsandbytesOptimizer, "adamw8bit", {"min_8bit_size": False},
     r"Option min_8bit_size must be an integer >= 0, got False\."),
]


@pytest.mark.parametrize(("cls", "mode", "options", "message"), CASES,
                         ids=[f"{mode}-{options}" for _, mode, options, _ in CASES])
def test_boolean_and_numeric_options_are_typed(cls, mode, options, message):
    with pytest.raises(ModeOptionError, match=message):
        cls(mode, **options)


@pytest.mark.parametrize(("mode", "options", "message"), [
    ("int8-training[master_weights=no]", {}, r"Option master_weights " + BOOL.format("no")),
    ("int8-training", {"master_weights": "False"}, r"Option master_weights "
                                                   + BOOL.format("False")),
    ("nf4", {"blocksize": "128"}, r"Option blocksize must be an integer >= 32"),
    ("nf4", {"keep_output_dtype": "no"}, r"Option keep_output_dtype " + BOOL.format("no")),
])
def test_string_modes_refuse_untyped_options_before_anything_changes(mode, options, message):
    model = make_lm()
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
    assert BitsandbytesMode("int8-training", master_weights=False).master_weights is False
    assert BitsandbytesMode("int8-training", master_weights=True).master_weights is True
    assert BitsandbytesMode("nf4", blocksize=128).blocksize == 128
    assert BitsandbytesMode("nf4", blocksize=128).options() == {"blocksize": 128}
    assert BitsandbytesMode("nf4", keep_output_dtype=True).options() == {"keep_output_dtype": True}
    assert BitsandbytesOptimizer("adamw8bit", min_8bit_size=0).min_8bit_size == 0
