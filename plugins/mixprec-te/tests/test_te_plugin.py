"""Registration: the modes, their options by name, discovery through the entry point,
and that nothing heavy is imported before a mode is used."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
from mixprec_te import TransformerEngineMode

import mixprec
from mixprec.exceptions import ModeOptionError


def test_the_plugin_provides_both_modes(fresh_registry):
    modes = fresh_registry.modes()
    for name in ("transformer-engine", "transformer-engine-float16"):
        entry = modes[name]
        assert entry.provider == "mixprec-te" and entry.spec.kind == "precision"
        assert "compute capability >= 8.9" in entry.spec.requires
        assert "transformer-engine[pytorch]" in entry.spec.requires
    assert fresh_registry.broken() == {}


def test_modes_built_by_name_take_options(fresh_registry):
    mode, optimizers = fresh_registry.build(
        "transformer-engine", {"recipe": {"amax_history_len": 16}, "ignore_modules": ["head"]})
    assert isinstance(mode, TransformerEngineMode) and optimizers == []
    assert mode.name == "transformer-engine" and mode.weights_dtype.is_floating_point
    assert mode.options() == {"recipe": {"scaling": "delayed", "amax_history_len": 16},
                              "ignore_modules": ["head"]}
    fp16, _ = fresh_registry.build("transformer-engine-float16", {"init_scale": 1024.0})
    assert fp16.create_scaler().scale == 1024.0
    assert fp16.options() == {"recipe": {"scaling": "delayed"}, "init_scale": 1024.0}


def test_option_typos_get_a_suggestion(fresh_registry):
    with pytest.raises(ModeOptionError, match=re.escape("does not take option 'recipie'. Did you mean 'recipe'?")):
        fresh_registry.build("transformer-engine", {"recipie": {}})
    with pytest.raises(ModeOptionError, match="'transformer-engine' does not take option 'init_scale'"):
        fresh_registry.build("transformer-engine", {"init_scale": 2.0})


def test_discovered_through_the_entry_point():
    registry = mixprec.Registry()
    modes = registry.modes()
    assert modes["transformer-engine"].provider == "mixprec-te"
    assert modes["transformer-engine-float16"].provider == "mixprec-te"
    assert "mixprec-te" not in registry.broken()


def test_nothing_heavy_is_imported_until_a_mode_is_used():
    code = textwrap.dedent("""
        import sys
        import mixprec
        reg = mixprec.registry()
        assert "transformer-engine" in reg.modes()
        assert "mixprec_te._mode" not in sys.modules, "plugin load imported the mode module"
        mode, _ = reg.build("transformer-engine", {"recipe": {"fp8_format": "E4M3"}})
        assert not any(m.split(".")[0] == "transformer_engine" for m in sys.modules)
        print(mode.describe())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "transformer-engine(recipe={'scaling': 'delayed', 'fp8_format': 'E4M3'})")


def test_public_names():
    import mixprec_te

    assert sorted(mixprec_te.__all__) == sorted(
        ["FP8_DIM_MULTIPLE", "INSTALL_HINT", "PIP_PACKAGE", "LayerDecision", "LayerPlan",
         "TransformerEngineMode", "__version__", "build_recipe", "describe_recipe", "linear_fits",
         "normalize_recipe", "plan_layers"])
    for name in mixprec_te.__all__:
        assert getattr(mixprec_te, name) is not None
    assert mixprec_te.PIP_PACKAGE == "transformer-engine[pytorch]"
    with pytest.raises(AttributeError):
        mixprec_te.nope  # noqa: B018
