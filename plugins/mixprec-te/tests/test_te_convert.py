"""Conversion of a built model: values copied, dtypes, names in the summary, one warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from _te_testing import CpuTestMode, Net
from mixprec_te._convert import BUILT, te_layer_from_torch, torch_layer_from_te

import mixprec


def convert(mode: mixprec.PrecisionMode, model: torch.nn.Module) -> tuple[list[str], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lines = mode.convert_module(model)
    return lines, [str(w.message) for w in caught if issubclass(w.category, mixprec.MixprecWarning)]


def test_layers_become_te_layers_with_the_same_values(te, net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    convert(CpuTestMode("bf16"), net)
    assert type(net.mlp[0]) is te.Linear and type(net.mlp[2]) is te.Linear
    assert type(net.norm) is te.LayerNorm and type(net.rms) is te.RMSNorm
    assert type(net.head) is torch.nn.Linear
    after = net.state_dict()
    for key, old in before.items():
        assert after[key].dtype is torch.bfloat16
        assert torch.equal(after[key], old.to(torch.bfloat16)), key
    assert net.norm.eps == 1e-5 and net.rms.eps == 1e-6


def test_linear_without_bias_has_no_bias_parameter(te, net):
    convert(CpuTestMode("bf16"), net)
    fc2 = net.mlp[2]
    assert fc2.use_bias is False
    assert [n for n, _ in fc2.named_parameters()] == ["weight"]
    assert "mlp.2.bias" not in net.state_dict()


def test_frozen_weights_and_eval_mode_carry_over(te):
    layer = torch.nn.Linear(32, 16)
    layer.weight.requires_grad_(False)
    layer.eval()
    new = te_layer_from_torch(te, layer, torch.float16, torch.device("cpu"))
    assert new.weight.requires_grad is False and new.bias.requires_grad is True
    assert new.training is False
    assert new.weight.dtype is torch.float16 and new in BUILT


def test_every_floating_tensor_is_stored_in_the_weights_dtype(te, net):
    lines, _ = convert(CpuTestMode("fp16"), net)
    assert {p.dtype for p in net.parameters()} == {torch.float16}
    assert net.gain.dtype is torch.float16
    assert "cast 3 parameters and 1 buffers to float16" in lines  # embed, head weight+bias


def test_conversion_leaves_the_random_streams_alone(te, net):
    state = torch.get_rng_state()
    convert(CpuTestMode("bf16"), net)
    assert torch.equal(torch.get_rng_state(), state)


def test_summary_and_one_warning_name_kept_layers_by_full_path(te):
    model = torch.nn.Module()
    model.decoder = Net()
    model.decoder.extra = torch.nn.Linear(24, 32)
    lines, warned = convert(CpuTestMode("bf16"), model)
    assert len(warned) == 1
    assert "decoder.head (in_features=32, out_features=20)" in warned[0]
    assert "decoder.extra (in_features=24, out_features=32)" in warned[0]
    assert warned[0].startswith("2 Linear layer(s) stay in bfloat16 because FP8 GEMMs need in/out "
                                "features divisible by 16")
    assert ("layers replaced: 1 nn.LayerNorm -> te.LayerNorm, 2 nn.Linear -> te.Linear, "
            "1 nn.RMSNorm -> te.RMSNorm") in lines
    assert any(line.startswith("kept, shapes FP8 GEMMs cannot take") and "decoder.head" in line
               for line in lines)
    assert lines[-1] == ("forward: TE FP8 autocast (DelayedScaling) inside torch.autocast('cpu', "
                         "bfloat16) on cpu")


def test_excluded_layers_are_listed_without_a_warning(te, net):
    lines, warned = convert(CpuTestMode("bf16", ignore_modules={"head", "mlp.0"}), net)
    assert warned == []
    assert type(net.mlp[0]) is torch.nn.Linear
    assert "kept (nn.Linear; excluded by ignore_modules ('head')): head" in lines


def test_an_ignore_entry_that_matches_nothing_warns(te, net):
    _, warned = convert(CpuTestMode("bf16", ignore_modules=["lm_head", "head"]), net)
    assert warned == ["ignore_modules entries ['lm_head'] match no module of the model; check the "
                      "names against model.named_modules()."]


def test_a_model_with_hand_placed_te_layers_is_not_converted_again(te):
    model = torch.nn.Module()
    model.fc = te.Linear(32, 32, device="cpu")
    model.plain = torch.nn.Linear(32, 32)
    model.odd = torch.nn.Linear(32, 20)
    fc = model.fc
    lines, warned = convert(CpuTestMode("bf16"), model)
    assert model.fc is fc and type(model.plain) is torch.nn.Linear
    assert "model already holds Transformer Engine layers (fc): no layer replaced" in lines
    assert warned == []  # nothing was up for conversion, so no shape warning
    assert model.plain.weight.dtype is torch.bfloat16
    assert model.fc.weight.dtype is torch.float32  # the user's TE layer keeps its dtype


def test_replace_layers_false_only_casts(te, net):
    lines, warned = convert(CpuTestMode("bf16", replace_layers=False), net)
    assert not any(type(m).__module__.startswith("transformer_engine") for m in net.modules())
    assert "replace_layers=False: no layer replaced" in lines and warned == []
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}


def test_rmsnorm_stays_where_te_has_none(te_legacy, net):
    lines, _ = convert(CpuTestMode("bf16"), net)
    assert type(net.rms) is torch.nn.RMSNorm
    assert "kept (nn.RMSNorm; this Transformer Engine has no te.RMSNorm): rms" in lines


def test_layers_kept_for_the_same_reason_share_one_summary_line(te):
    model = torch.nn.Module()
    model.attn = torch.nn.ModuleList(torch.nn.MultiheadAttention(32, 2) for _ in range(3))
    lines, _ = convert(CpuTestMode("bf16"), model)
    kept = [line for line in lines if line.startswith("kept")]
    assert kept == ["kept (nn.Linear; NonDynamicallyQuantizableLinear subclasses nn.Linear; its "
                    "forward may differ): attn.0.out_proj, attn.1.out_proj, attn.2.out_proj"]


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Linear(32, 16), lambda: torch.nn.Linear(16, 32, bias=False),
    lambda: torch.nn.LayerNorm(32, eps=1e-3), lambda: torch.nn.RMSNorm(16, eps=1e-6),
])
def test_te_layers_turn_back_into_equal_torch_layers(te, make):
    layer = make()
    back = torch_layer_from_te(te_layer_from_torch(te, layer, torch.float32, torch.device("cpu")))
    assert type(back) is type(layer)
    assert back.eps == layer.eps if hasattr(layer, "eps") else True
    assert back.state_dict().keys() == layer.state_dict().keys()
    for key, value in layer.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    x = torch.randn(8, layer.weight.shape[-1])
    torch.testing.assert_close(back(x), layer(x), rtol=0, atol=0)
