"""Registration, discovery through the entry point, lazy import, option errors."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import mixprec_torchao
import pytest
import torch

import mixprec
from mixprec.exceptions import MissingDependencyError, ModeOptionError

FP8_MODES = ["fp8-tensorwise", "fp8-rowwise", "fp8-rowwise-gw-hp"]
OPTIM_MODES = ["ao-adamw8bit", "ao-adamw4bit", "ao-adamw-fp8"]


def test_entry_point_discovers_the_six_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="mixprec")}
    assert eps["mixprec-torchao"] == "mixprec_torchao.plugin"
    monkeypatch.setenv("MIXPREC_LOAD_PLUGINS", "mixprec-torchao")
    reg = mixprec.Registry(entry_points=True)
    modes = reg.modes()
    for name in FP8_MODES + OPTIM_MODES:
        assert modes[name].provider == "mixprec-torchao"
        assert modes[name].version == mixprec_torchao.__version__
    assert {modes[n].spec.kind for n in FP8_MODES} == {"precision"}
    assert {modes[n].spec.kind for n in OPTIM_MODES} == {"optimizer"}
    assert reg.broken() == {}


def test_importing_the_plugin_does_not_import_torchao() -> None:
    code = ("import sys, mixprec; mixprec.registry().modes(); import mixprec_torchao.plugin; "
            "print('torchao' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("mode", FP8_MODES)
def test_mode_objects_from_strings(mode: str) -> None:
    precision, optimizers = mixprec.registry().build(f"{mode}+ao-adamw4bit", {})
    assert isinstance(precision, mixprec_torchao.Float8Training)
    assert precision.name == mode
    assert precision.recipe == mixprec_torchao.RECIPES[mode]
    assert [o.name for o in optimizers] == ["ao-adamw4bit"]


def test_unknown_option_suggests_the_right_one() -> None:
    with pytest.raises(ModeOptionError, match=r"does not take option 'ignore_module'.*"
                                              r"Did you mean 'ignore_modules'"):
        mixprec.registry().build("fp8-tensorwise", {"ignore_module": ["head"]})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"autocast": "fp16"}, r"Unsupported autocast 'fp16'; use one of 'bf16', 'none'\."),
        ({"param_dtype": "fp16"}, r"Unsupported param_dtype 'fp16'; use one of '32', 'bf16'\."),
        ({"master_weights": True}, r"master_weights=True needs param_dtype='bf16'"),
        ({"ignore_modules": [3]}, r"ignore_modules takes dotted module names or globs .*; got 3\."),
        ({"module_filter": "head"}, r"module_filter must be a function"),
    ],
)
def test_bad_fp8_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ModeOptionError, match=message):
        mixprec.registry().build("fp8-rowwise", options)


def test_bad_recipe_and_optimizer_options() -> None:
    with pytest.raises(ModeOptionError, match=r"Unknown FP8 recipe 'blockwise'; use one of"):
        mixprec_torchao.Float8Training("blockwise")
    with pytest.raises(ModeOptionError, match=r"Option block_size must be an integer > 0, got 0\."):
        mixprec_torchao.LowBitAdamW("8bit", block_size=0)
    with pytest.raises(ModeOptionError, match=r"block_size must be even for ao-adamw4bit"):
        mixprec_torchao.LowBitAdamW("4bit", block_size=127)
    with pytest.raises(ModeOptionError, match=r"Unknown low-bit AdamW '2bit'"):
        mixprec_torchao.LowBitAdamW("2bit")


def test_options_are_plain_values_for_checkpoints() -> None:
    mode = mixprec_torchao.Float8Training(
        "rowwise", ignore_modules=["head", "body.0"], module_filter=lambda m, n: True,
        param_dtype="bf16", master_weights=True, autocast=None, emulate=True,
    )
    options = mode.options()
    assert options == {
        "ignore_modules": ["body.0", "head"], "module_filter": "test_options_are_plain_values_"
        "for_checkpoints.<locals>.<lambda>", "autocast": None, "param_dtype": "bf16",
        "master_weights": True, "emulate": True,
    }
    opt_mode = mixprec_torchao.LowBitAdamW("fp8", block_size=128, bf16_stochastic_round=True)
    assert opt_mode.options() == {"block_size": 128, "bf16_stochastic_round": True}
    assert opt_mode.describe() == "ao-adamw-fp8(block_size=128, bf16_stochastic_round=True)"


def test_missing_torchao_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an uninstalled package looks like
    with pytest.raises(MissingDependencyError, match=r"needs torchao.*pip install 'torchao>=0.18'") as err:
        mixprec.registry().build("fp8-tensorwise", {})
    assert err.value.package == "torchao>=0.18"
    with pytest.raises(MissingDependencyError, match=r"Mode 'ao-adamw8bit' needs torchao"):
        mixprec.registry().build("32-true+ao-adamw8bit", {})


def test_too_old_torchao_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchao

    monkeypatch.setattr(torchao, "__version__", "0.9.0+cu121")
    with pytest.raises(MissingDependencyError, match=r"needs torchao 0.18 or newer, but 0.9.0"):
        mixprec_torchao.Float8Training("tensorwise")


def test_wrap_by_mode_objects_and_list() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    opt = torch.optim.AdamW(model.parameters())
    model, opt = mixprec.wrap(model, opt, mode=[mixprec_torchao.Float8Training("rowwise"),
                                                "ao-adamw8bit"])
    assert opt.precision.mode_name == "fp8-rowwise+ao-adamw8bit"


def test_public_names_are_the_documented_ones() -> None:
    assert sorted(mixprec_torchao.__all__) == [
        "Float8Training", "LowBitAdamW", "RECIPES", "__version__", "state_bytes"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in mixprec_torchao.__all__:
        if name != "__version__":
            assert f"`{name}" in readme, name
