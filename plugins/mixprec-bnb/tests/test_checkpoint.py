"""Checkpoints: quantized state dicts round-trip, full-precision ones quantize on load,
loading really replaces the weights, bad checkpoints change nothing, exact resume."""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch
from conftest import make_lm, train, wrap_quiet
from mixprec_bnb import BitsandbytesMode

from mixprec.exceptions import CheckpointError
from mixprec.testing import assert_state_equal
from mixprec.testing import checkpoint_roundtrip as roundtrip

MODES = ["nf4", "nf4-dq", "fp4", "fp4-dq", "int8", "int8-training"]


@pytest.mark.parametrize("mode", MODES)
def test_quantized_state_dict_round_trips_exactly_into_a_fresh_wrap(mode: str) -> None:
    source = wrap_quiet(make_lm(0), None, mode)
    saved = roundtrip(source.state_dict())
    target = wrap_quiet(make_lm(1), None, mode)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    result = target.load_state_dict(saved)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_state_equal(target.state_dict(), source.state_dict())
    # the values really changed (a loader that ignored the entries would leave them)
    changed = [k for k, v in target.state_dict().items()
               if k.endswith("up.weight") and not torch.equal(v, before[k])]
    assert changed == ["blocks.0.up.weight", "blocks.1.up.weight"]
    tokens = torch.randint(0, 64, (2, 8))
    assert torch.equal(target(tokens), source(tokens))


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "fp4-dq"])
def test_full_precision_checkpoint_is_quantized_on_load(mode: str) -> None:
    dense = make_lm(3).state_dict()
    wrapped = wrap_quiet(make_lm(1), None, mode)
    wrapped.load_state_dict(dense)
    layer = wrapped.blocks[1].down
    q, qs = bnbF.quantize_4bit(dense["blocks.1.down.weight"], blocksize=64,
                               compress_statistics=mode.endswith("-dq"),
                               quant_type=mode[:3])
    assert torch.equal(layer.weight.data, q)
    assert torch.equal(layer.weight.quant_state.absmax, qs.absmax)
    assert torch.equal(layer.bias, dense["blocks.1.down.bias"])
    reference = wrap_quiet(make_lm(3), None, mode)
    assert_state_equal(wrapped.state_dict(), reference.state_dict())


@pytest.mark.parametrize("mode", ["int8", "int8-training"])
def test_full_precision_checkpoint_into_int8_layers(mode: str) -> None:
    dense = make_lm(3).state_dict()
    wrapped = wrap_quiet(make_lm(1), None, mode)
    wrapped(torch.randint(0, 64, (1, 4)))  # bitsandbytes' Linear8bitLt cannot load after this
    wrapped.load_state_dict(dense)
    reference = wrap_quiet(make_lm(3), None, mode)
    assert_state_equal(wrapped.state_dict(), reference.state_dict())


def test_int8_training_loads_in_place_so_the_optimizer_keeps_its_entry() -> None:
    model = make_lm(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wrapped, wopt = wrap_quiet(model, opt, "int8-training")
    weight = wrapped.blocks[0].up.weight
    wrapped.load_state_dict(make_lm(3).state_dict())
    assert wrapped.blocks[0].up.weight is weight
    assert any(p is weight for g in wopt.param_groups for p in g["params"])


@pytest.mark.parametrize(
    ("saved", "loaded", "message"),
    [
        ("fp4", "nf4", r"'blocks.0.up.weight' was quantized as fp4 but the model is nf4: wrap "
                       r"with mode 'fp4'"),
        ("nf4", "nf4-dq", r"was quantized as nf4 but the model is nf4-dq"),
        (BitsandbytesMode("nf4", blocksize=128), "nf4",
         r"was quantized with blocksize 128 but the model uses 64: build the mode with "
         r"blocksize=128"),
        ("int8", "int8-training", r"holds frozen int8 weights \(mode int8\) but int8-training"),
    ],
)
def test_mismatched_checkpoints_are_refused_before_anything_changes(
        saved: object, loaded: str, message: str) -> None:
    state = wrap_quiet(make_lm(0), None, saved).state_dict()
    wrapped = wrap_quiet(make_lm(1), None, loaded)
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        wrapped.load_state_dict(state)
    assert_state_equal(wrapped.state_dict(), before)


def test_wrong_shapes_and_missing_keys_are_refused_before_anything_changes() -> None:
    wrapped = wrap_quiet(make_lm(1), None, "nf4-dq")
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    dense = make_lm(3).state_dict()
    bad = dict(dense, **{"blocks.0.up.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match=r"'blocks.0.up.weight' has shape \(3, 3\) without "
                                              r"4-bit quant state, but the layer expects"):
        wrapped.load_state_dict(bad)
    partial = {k: v for k, v in dense.items() if not k.startswith("lm_head")}
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing lm_head.bias, lm_head.weight; "
                                              r"unexpected extra.weight\); load it with strict=False"):
        wrapped.load_state_dict(partial)
    assert_state_equal(wrapped.state_dict(), before)
    result = wrapped.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["lm_head.weight", "lm_head.bias"]
    assert result.unexpected_keys == ["extra.weight"]
    assert not torch.equal(wrapped.state_dict()["blocks.0.up.weight"],
                           before["blocks.0.up.weight"])


def test_incomplete_quant_state_is_refused() -> None:
    state = wrap_quiet(make_lm(0), None, "nf4").state_dict()
    del state["blocks.0.up.weight.absmax"]
    wrapped = wrap_quiet(make_lm(1), None, "nf4")
    with pytest.raises(CheckpointError, match=r"has an incomplete 4-bit quant state"):
        wrapped.load_state_dict(state)


@pytest.mark.parametrize("mode", ["nf4-dq+adamw8bit", "int8-training+adamw8bit",
                                  "32-true+adam8bit", "bf16-true+adamw8bit"])
def test_resume_is_bit_identical(mode: str) -> None:
    def fresh(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = make_lm(seed)
        groups = [{"params": [p for n, p in model.named_parameters() if "norm" not in n]},
                  {"params": [p for n, p in model.named_parameters() if "norm" in n],
                   "weight_decay": 0.0}]
        opt = (torch.optim.Adam if mode.endswith("+adam8bit") else torch.optim.AdamW)(
            groups, lr=3e-3)
        return wrap_quiet(model, opt, mode)

    model, opt = fresh(0)
    straight = train(model, opt, 6)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    final_opt = roundtrip(opt.state_dict())

    model, opt = fresh(0)
    first = train(model, opt, 3)
    checkpoint = roundtrip(opt.precision.state_dict())
    model2, opt2 = fresh(5)
    opt2.precision.load_state_dict(checkpoint)
    second = train(model2, opt2, 3, start=3)
    assert first + second == straight
    assert_state_equal(model2.state_dict(), final)
    resumed_opt = roundtrip(opt2.state_dict())
    assert resumed_opt["mixprec"] == final_opt["mixprec"]
    assert resumed_opt["param_groups"] == final_opt["param_groups"]
    for index, state in final_opt["state"].items():
        assert_state_equal(resumed_opt["state"][index], state)
