"""Recipe dicts are validated key by key; TE recipe objects are built, or passed through."""

from __future__ import annotations

import io

import pytest
import torch
from mixprec_te import TransformerEngineMode, build_recipe, describe_recipe, normalize_recipe

from mixprec.exceptions import MissingDependencyError, ModeOptionError


def test_normalize_fills_in_scaling_and_canonical_values():
    assert normalize_recipe({"fp8_format": "hybrid", "amax_history_len": 16,
                             "amax_compute_algo": "max"}) == {
        "scaling": "delayed", "fp8_format": "HYBRID", "amax_history_len": 16,
        "amax_compute_algo": "max"}
    assert normalize_recipe({"scaling": "current", "fp8_format": "E4M3"}) == {
        "scaling": "current", "fp8_format": "E4M3"}
    assert normalize_recipe({}) == {"scaling": "delayed"}


@pytest.mark.parametrize(("spec", "message"), [
    ({"amax_histroy_len": 16}, "Unknown recipe key 'amax_histroy_len'. Did you mean 'amax_history_len'?"),
    ({"scaling": "current", "amax_history_len": 16}, "does not apply to current scaling"),
    ({"scaling": "mxfp8"}, "Recipe scaling 'mxfp8' is not supported"),
    ({"fp8_format": "E5M2"}, "not supported: Transformer Engine does not train in pure E5M2"),
    ({"fp8_format": "FP16"}, "is not an FP8 format; use 'HYBRID'"),
    ({"amax_history_len": 0}, "amax_history_len must be an integer >= 1, got 0"),
    ({"amax_history_len": 16.0}, "amax_history_len must be an integer >= 1"),
    ({"amax_history_len": True}, "amax_history_len must be an integer >= 1"),
    ({"margin": -1}, "margin must be an integer >= 0"),
    ({"amax_compute_algo": "mean"}, "must be 'max' or 'most_recent'"),
    ({"reduce_amax": 1}, "reduce_amax must be True or False"),
])
def test_bad_recipe_dicts_are_clear_errors(spec, message):
    with pytest.raises(ModeOptionError) as info:
        normalize_recipe(spec)
    assert message in str(info.value)


def test_recipe_must_be_a_dict_or_a_te_recipe():
    with pytest.raises(ModeOptionError, match="recipe must be a Transformer Engine recipe object or a dict"):
        TransformerEngineMode("bf16", recipe="HYBRID")


def test_bad_dict_fails_when_the_mode_is_built_without_te(no_te):
    with pytest.raises(ModeOptionError, match="Did you mean 'fp8_format'"):
        TransformerEngineMode("bf16", recipe={"fp8_fromat": "HYBRID"})


def test_building_the_recipe_needs_te(no_te):
    mode = TransformerEngineMode("bf16", recipe={"amax_history_len": 16})
    assert mode.options()["recipe"] == {"scaling": "delayed", "amax_history_len": 16}
    with pytest.raises(MissingDependencyError, match="transformer-engine"):
        mode.recipe  # noqa: B018


def test_delayed_recipe_built_with_the_given_fields(te):
    from transformer_engine.common.recipe import DelayedScaling, Format

    spec = normalize_recipe({"fp8_format": "E4M3", "amax_history_len": 16,
                             "amax_compute_algo": "most_recent", "margin": 1})
    recipe = build_recipe(spec, __import__("transformer_engine.common.recipe", fromlist=["x"]))
    assert type(recipe) is DelayedScaling
    assert recipe.fp8_format is Format.E4M3
    assert (recipe.amax_history_len, recipe.amax_compute_algo, recipe.margin) == (16, "most_recent", 1)
    assert recipe.reduce_amax is True  # TE's default for keys not given


def test_default_recipe_is_tes_delayed_scaling(te):
    from transformer_engine.common.recipe import DelayedScaling

    assert TransformerEngineMode("bf16").recipe == DelayedScaling()


def test_current_scaling_where_te_has_it(te):
    from transformer_engine.common.recipe import Float8CurrentScaling, Format

    mode = TransformerEngineMode("bf16", recipe={"scaling": "current", "fp8_format": "E4M3"})
    assert mode.recipe == Float8CurrentScaling(fp8_format=Format.E4M3)


def test_current_scaling_on_a_te_without_it_says_which_version(te_legacy):
    mode = TransformerEngineMode("bf16", recipe={"scaling": "current"})
    with pytest.raises(ModeOptionError, match=r"lacks; upgrade to >= 2\.2 or use 'delayed' scaling"):
        mode.recipe  # noqa: B018


def test_keys_the_installed_te_lacks_are_reported_not_passed(te_legacy):
    mode = TransformerEngineMode("bf16", recipe={"fp8_dpa": True})
    with pytest.raises(ModeOptionError, match="'fp8_dpa' is not an option of DelayedScaling in "
                                              r"Transformer Engine 2\.20\.0\+standin"):
        mode.recipe  # noqa: B018


def test_a_recipe_object_is_used_as_given_and_described_in_plain_values(te):
    from transformer_engine.common.recipe import DelayedScaling, Format

    recipe = DelayedScaling(fp8_format=Format.E4M3, amax_history_len=32,
                            amax_compute_algo=lambda h: h.max())
    mode = TransformerEngineMode("bf16", recipe=recipe)
    assert mode.recipe is recipe
    described = mode.options()["recipe"]
    assert described == describe_recipe(recipe)
    assert described["scaling"] == "delayed"
    assert described["fp8_format"] == "E4M3" and described["amax_history_len"] == 32
    assert "amax_compute_algo" not in described  # a function is not a plain value
    buf = io.BytesIO()
    torch.save(mode.options(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == mode.options()
