"""init_module builds TE layers directly, with the same shape rules and exclusions as wrap."""

from __future__ import annotations

import warnings

import torch
from _te_testing import CpuTestMode, Net

import mixprec


def build(mode):
    with mixprec.init_module(mode, device="meta") as precision:
        model = Net()
        inside = {"linear_isinstance": isinstance(model.head, torch.nn.Linear),
                  "default_dtype": torch.get_default_dtype()}
    return precision, model, inside


def test_fitting_layers_are_built_as_te_layers_on_the_device(te):
    _, model, inside = build(CpuTestMode("bf16"))
    assert type(model.mlp[0]) is te.Linear and type(model.mlp[2]) is te.Linear
    assert type(model.norm) is te.LayerNorm and type(model.rms) is te.RMSNorm
    assert model.mlp[0].weight.device.type == "meta" and model.mlp[0].weight.dtype is torch.bfloat16
    assert model.mlp[2].use_bias is False and model.rms.eps == 1e-6
    # the same shape rule as wrap: the head (32 -> 20) stays a torch Linear
    assert type(model.head) is torch.nn.Linear and model.head.weight.dtype is torch.bfloat16
    assert model.embed.weight.device.type == "meta"
    assert inside == {"linear_isinstance": True, "default_dtype": torch.bfloat16}
    assert torch.get_default_dtype() is torch.float32
    assert type(torch.nn.Linear) is type and torch.nn.Linear(2, 2).__class__ is torch.nn.Linear


def test_wrap_after_init_names_the_kept_head_once_and_does_not_convert_again(te):
    precision, model, _ = build(CpuTestMode("bf16"))
    model.to_empty(device="cpu")
    model.load_state_dict(Net().state_dict(), strict=False)
    built = model.mlp[0]
    opt = torch.optim.AdamW(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, opt = precision.wrap(model, opt)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "head (in_features=32, out_features=20)" in messages[0]
    assert model.mlp[0] is built
    lines = opt.precision.summary_lines
    assert "layers replaced: none" in lines
    assert "already Transformer Engine layers (built by init_module): 4" in lines


def test_exclusions_apply_to_layers_built_in_init(te):
    precision, model, _ = build(CpuTestMode("bf16", ignore_modules=["mlp.0"]))
    assert type(model.mlp[0]) is te.Linear  # names are unknown while the model is built
    model.to_empty(device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixprec.MixprecWarning)
        model = precision.wrap(model)
    assert type(model.mlp[0]) is torch.nn.Linear
    assert model.mlp[0].weight.dtype is torch.bfloat16
    assert "back to torch layers (ignore_modules): mlp.0" in model.precision.summary_lines


def test_replace_layers_false_only_sets_dtype_and_device(te):
    _, model, _ = build(CpuTestMode("bf16", replace_layers=False))
    assert type(model.mlp[0]) is torch.nn.Linear
    assert model.mlp[0].weight.dtype is torch.bfloat16 and model.mlp[0].weight.device.type == "meta"
