"""Typed options: a boolean option takes True/False only, a number must be in its range
and the error says the range (``mixprec.utils.check_bool`` / ``check_number`` for the
mode's options, the recipe's own checks for recipe keys, ``mixprec.LossScaler`` for the
loss-scaler options). Nothing here needs Transformer Engine: options are checked when
the mode is built."""

from __future__ import annotations

import pytest
import torch
from mixprec_te import TransformerEngineMode

import mixprec
from mixprec.exceptions import ModeOptionError

BOOL = "takes True or False, got {!r}; pass a bool"

CASES = [
    ("bf16", {"master_weights": "no"}, "Option master_weights " + BOOL.format("no")),
    ("fp16", {"master_weights": "False"}, "Option master_weights " + BOOL.format("False")),
    ("bf16", {"master_weights": 1}, "Option master_weights " + BOOL.format(1)),
    ("bf16", {"keep_output_dtype": "yes"}, "Option keep_output_dtype " + BOOL.format("yes")),
    ("fp16", {"keep_output_dtype": 0}, "Option keep_output_dtype " + BOOL.format(0)),
    ("bf16", {"replace_layers": "no"}, "Option replace_layers " + BOOL.format("no")),
    ("bf16", {"replace_layers": None}, "Option replace_layers " + BOOL.format(None)),
    ("bf16", {"recipe": {"reduce_amax": "yes"}}, "Recipe reduce_amax must be True or False, got 'yes'."),
    ("bf16", {"recipe": {"fp8_dpa": 1}}, "Recipe fp8_dpa must be True or False, got 1."),
    ("bf16", {"recipe": {"amax_history_len": "16"}},
     "Recipe amax_history_len must be an integer >= 1, got '16'."),
    ("bf16", {"recipe": {"margin": -1}}, "Recipe margin must be an integer >= 0, got -1."),
    ("fp16", {"growth_interval": 0}, "growth_interval must be a positive integer"),
    ("fp16", {"hysteresis": 1.5}, "hysteresis must be"),
    ("fp16", {"init_scale": "1024"}, "init_scale must be"),
    ("fp16", {"backoff_factor": 1.5}, "backoff_factor must be in (0, 1)"),
]


@pytest.mark.parametrize(("weights", "options", "message"), CASES,
                         ids=[f"{w}-{o}" for w, o, _ in CASES])
def test_boolean_and_numeric_options_are_typed(weights, options, message):
    with pytest.raises(ModeOptionError) as info:
        TransformerEngineMode(weights, **options)
    assert message in str(info.value)


@pytest.mark.parametrize(("mode", "options", "message"), [
    ("transformer-engine[master_weights=no]", {}, "Option master_weights " + BOOL.format("no")),
    ("transformer-engine", {"keep_output_dtype": "no"},
     "Option keep_output_dtype " + BOOL.format("no")),
    ("transformer-engine-float16", {"master_weights": "True"},
     "Option master_weights " + BOOL.format("True")),
])
def test_string_modes_refuse_untyped_options_before_anything_changes(fresh_registry, net, mode,
                                                                     options, message):
    opt = torch.optim.AdamW(net.parameters())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modules = [(n, type(m)) for n, m in net.named_modules()]
    with pytest.raises(ModeOptionError) as info:
        mixprec.wrap(net, opt, mode, **options)
    assert message in str(info.value)
    assert not mixprec.is_wrapped(net)
    assert [(n, type(m)) for n, m in net.named_modules()] == modules
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_typed_options_take_real_values():
    assert TransformerEngineMode("bf16", master_weights=False).master_weights is False
    assert TransformerEngineMode("bf16", master_weights=True).master_weights is True
    assert TransformerEngineMode("fp16").master_weights is True
    assert TransformerEngineMode("bf16", keep_output_dtype=True).keep_output_dtype is True
    assert TransformerEngineMode("bf16", replace_layers=False).replace_layers is False
