"""The layer-selection rules (pure torch: no Transformer Engine needed)."""

from __future__ import annotations

import pytest
import torch
from _te_testing import Net
from mixprec_te import linear_fits, plan_layers
from mixprec_te._policy import layernorm_keep_reason, matches, rmsnorm_keep_reason


def decisions(model: torch.nn.Module, **kwargs) -> dict[str, tuple[bool, str]]:
    return {d.name: (d.convert, d.reason) for d in plan_layers(model, **kwargs).decisions}


@pytest.mark.parametrize(("shape", "fits"), [
    ((16, 16), True), ((32, 4096), True), ((4096, 11008), True),
    ((20, 16), False), ((16, 20), False), ((8, 16), False), ((16, 8), False), ((1, 1), False),
])
def test_linear_fits_needs_both_dims_divisible_by_16(shape, fits):
    assert linear_fits(*shape) is fits


def test_net_plan_converts_fitting_layers_and_keeps_the_head_for_its_shape():
    plan = plan_layers(Net())
    got = decisions(Net())
    assert {n for n, (c, _) in got.items() if c} == {"norm", "mlp.0", "mlp.2", "rms"}
    assert [d.name for d in plan.shape_kept] == ["head"]
    assert got["head"] == (False, "in_features=32, out_features=20: FP8 GEMMs need both divisible by 16")
    assert plan.foreign_te == [] and plan.revert == [] and plan.unmatched_ignores == []


def test_kept_layers_are_named_by_full_dotted_path():
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"proj": torch.nn.Linear(32, 24)})
                                       for _ in range(2))
    plan = plan_layers(model)
    assert [d.name for d in plan.shape_kept] == ["blocks.0.proj", "blocks.1.proj"]


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"normalized_shape": 32}, None),
    ({"normalized_shape": (32,)}, None),
    ({"normalized_shape": (4, 8)}, "multi-dimensional"),
    ({"normalized_shape": 32, "elementwise_affine": False}, "always has a weight and a bias"),
    ({"normalized_shape": 32, "bias": False}, "always has a bias"),
])
def test_layernorm_variants_convert_or_stay_without_crashing(kwargs, reason):
    model = torch.nn.Sequential(torch.nn.LayerNorm(**kwargs))
    convert, why = decisions(model)["0"]
    assert convert is (reason is None)
    assert (reason or "") in why
    shape = kwargs["normalized_shape"]
    assert (layernorm_keep_reason(shape, kwargs.get("elementwise_affine", True),
                                  kwargs.get("bias", True)) is None) is (reason is None)


@pytest.mark.parametrize(("kwargs", "has_te_rmsnorm", "reason"), [
    ({"normalized_shape": 32, "eps": 1e-6}, True, None),
    ({"normalized_shape": 32, "eps": 1e-6}, False, "no te.RMSNorm"),
    ({"normalized_shape": 32}, True, "eps=None"),
    ({"normalized_shape": (2, 16), "eps": 1e-6}, True, "multi-dimensional"),
    ({"normalized_shape": 32, "eps": 1e-6, "elementwise_affine": False}, True, "always has a weight"),
])
def test_rmsnorm_variants(kwargs, has_te_rmsnorm, reason):
    model = torch.nn.Sequential(torch.nn.RMSNorm(**kwargs))
    convert, why = decisions(model, te_has_rmsnorm=has_te_rmsnorm)["0"]
    assert convert is (reason is None)
    assert (reason or "") in why
    assert (rmsnorm_keep_reason(kwargs["normalized_shape"], kwargs.get("eps"),
                                kwargs.get("elementwise_affine", True), has_te_rmsnorm)
            is None) is (reason is None)


def test_linear_without_bias_converts():
    assert decisions(torch.nn.Sequential(torch.nn.Linear(32, 32, bias=False)))["0"] == (True, "")


def test_subclasses_keep_their_own_forward():
    class LoRALinear(torch.nn.Linear):
        pass

    model = torch.nn.Module()
    model.lora = LoRALinear(32, 32)
    model.attn = torch.nn.MultiheadAttention(32, 2)
    got = decisions(model)
    assert got["lora"] == (False, "LoRALinear subclasses nn.Linear; its forward may differ")
    assert got["attn.out_proj"][0] is False
    assert "NonDynamicallyQuantizableLinear subclasses nn.Linear" in got["attn.out_proj"][1]


def test_tied_weights_stay_tied():
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(64, 32)
    model.head = torch.nn.Linear(32, 64, bias=False)
    model.head.weight = model.embed.weight
    assert decisions(model)["head"] == (False, "weight is shared with embed.weight")


def test_a_layer_registered_twice_stays():
    shared = torch.nn.Linear(32, 32)
    model = torch.nn.Module()
    model.a, model.b = shared, shared
    assert decisions(model)["a"] == (False, "registered under more than one name")


def test_ignore_modules_prefixes_and_globs():
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList(
        torch.nn.ModuleDict({"attn": torch.nn.Linear(32, 32), "mlp": torch.nn.Linear(32, 32)})
        for _ in range(2)
    )
    model.lm_head = torch.nn.Linear(32, 64)
    plan = plan_layers(model, ignore_modules=["lm_head", "blocks.*.attn", "blocks.1", "decoder"])
    got = {d.name: d for d in plan.decisions}
    assert [n for n, d in got.items() if d.convert] == ["blocks.0.mlp"]
    assert got["lm_head"].reason == "excluded by ignore_modules ('lm_head')"
    assert got["blocks.0.attn"].reason == "excluded by ignore_modules ('blocks.*.attn')"
    assert got["blocks.1.mlp"].reason == "excluded by ignore_modules ('blocks.1')"
    assert plan.shape_kept == []  # excluded layers are never reported as shape problems
    assert plan.unmatched_ignores == ["decoder"]


@pytest.mark.parametrize(("name", "patterns", "hit"), [
    ("lm_head", ["lm_head"], "lm_head"),
    ("lm_head.proj", ["lm_head"], "lm_head"),
    ("lm_header", ["lm_head"], None),
    ("blocks.3.attn.q", ["blocks.*.attn.*"], "blocks.*.attn.*"),
    ("x", [], None),
])
def test_matches(name, patterns, hit):
    assert matches(name, patterns) == hit


def test_the_model_itself_as_a_layer_is_not_replaced():
    got = decisions(torch.nn.Linear(32, 32))
    assert got["(the model itself)"][0] is False


def test_foreign_te_layers_stop_conversion(te):
    model = torch.nn.Module()
    model.fc = te.Linear(32, 32, device="cpu")
    model.other = torch.nn.Linear(32, 32)
    plan = plan_layers(model)
    assert plan.foreign_te == ["fc"]
    assert plan.to_convert == []
    assert [d.name for d in plan.decisions] == ["other"]  # reported, not converted


def test_te_layers_built_by_mixprec_are_not_foreign_and_revert_when_excluded(te):
    model = torch.nn.Module()
    model.fc = te.Linear(32, 32, device="cpu")
    model.other = torch.nn.Linear(32, 32)
    plan = plan_layers(model, built_by_mixprec={model.fc}, ignore_modules=["fc"])
    assert plan.foreign_te == []
    assert plan.revert == ["fc"]
    assert [d.name for d in plan.to_convert] == ["other"]


def test_every_ignore_modules_entry_that_selects_a_module_is_used():
    """Two entries selecting the same module (a short name and peft's full one) are both
    used; before, only the first counted and the second was 'matches no module'."""
    model = torch.nn.Module()
    model.base_model = torch.nn.Module()
    model.base_model.model = torch.nn.Module()
    model.base_model.model.lm_head = torch.nn.Linear(32, 64)
    model.base_model.model.fc = torch.nn.Linear(32, 32)
    plan = plan_layers(model, ignore_modules=["lm_head", "base_model.model.lm_head", "nothing"])
    assert plan.unmatched_ignores == ["nothing"]
