"""Registration, discovery through the entry point, lazy import, option errors."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import mixprec_bnb
import pytest
import torch

import mixprec
from mixprec.exceptions import MissingDependencyError, ModeOptionError

PRECISION = ["nf4", "nf4-dq", "fp4", "fp4-dq", "int8", "int8-training"]
OPTIMIZER = ["adam8bit", "adamw8bit", "paged-adam8bit", "paged-adamw8bit"]


def test_entry_point_discovers_the_ten_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="mixprec")}
    assert eps["mixprec-bnb"] == "mixprec_bnb.plugin"
    monkeypatch.setenv("MIXPREC_LOAD_PLUGINS", "mixprec-bnb")
    reg = mixprec.Registry(entry_points=True)
    modes = reg.modes()
    for name in PRECISION + OPTIMIZER:
        assert modes[name].provider == "mixprec-bnb"
        assert modes[name].version == mixprec_bnb.__version__
    assert {modes[n].spec.kind for n in PRECISION} == {"precision"}
    assert {modes[n].spec.kind for n in OPTIMIZER} == {"optimizer"}
    assert [n for n in PRECISION + OPTIMIZER if modes[n].spec.requires] == [
        "paged-adam8bit", "paged-adamw8bit"]
    assert modes["paged-adamw8bit"].spec.requires == "CUDA"
    assert reg.broken() == {}


def test_importing_the_plugin_does_not_import_bitsandbytes() -> None:
    code = ("import sys, mixprec, mixprec_bnb; mixprec.registry().modes(); "
            "import mixprec_bnb.plugin; print('bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_bitsandbytes_is_a_clear_error() -> None:
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import mixprec\n"
        "try:\n"
        "    mixprec.registry().build('nf4-dq+adamw8bit', {})\n"
        "except mixprec.exceptions.MissingDependencyError as e:\n"
        "    print(type(e).__name__, e.package, '|', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("MissingDependencyError bitsandbytes>=0.50 | Mode 'nf4-dq' "
                                 "needs bitsandbytes, which cannot be imported")
    assert "pip install mixprec-bnb" in out.stdout
    assert issubclass(MissingDependencyError, ImportError)


@pytest.mark.parametrize("mode", PRECISION)
def test_mode_strings_build_mode_objects(mode: str) -> None:
    precision, optimizers = mixprec.registry().build(f"{mode}+adamw8bit", {})
    assert isinstance(precision, mixprec_bnb.BitsandbytesMode)
    assert precision.name == mode
    assert [type(o) for o in optimizers] == [mixprec_bnb.BitsandbytesOptimizer]
    assert optimizers[0].name == "adamw8bit"


def test_optimizer_mode_alone_means_32_true() -> None:
    precision, optimizers = mixprec.registry().build("paged-adam8bit", {})
    assert precision.name == "32-true"
    assert optimizers[0].class_name == "PagedAdam8bit" and optimizers[0].paged


def test_options_are_plain_values_for_checkpoints() -> None:
    mode = mixprec_bnb.BitsandbytesMode("nf4", dtype=torch.float32, ignore_modules={"b", "a"},
                                        blocksize=128, quant_storage="bfloat16")
    assert mode.options() == {"dtype": "float32", "ignore_modules": ["a", "b"],
                              "blocksize": 128, "quant_storage": "bfloat16"}
    assert mixprec_bnb.BitsandbytesMode("int8").options() == {}
    opt = mixprec_bnb.BitsandbytesOptimizer("adamw8bit", optim_32bit_modules=[
        torch.nn.Embedding, "lm_head"], min_8bit_size=1024)
    assert opt.options() == {"optim_32bit_modules": ["lm_head", "torch.nn.modules.sparse.Embedding"],
                             "min_8bit_size": 1024}
    assert mixprec_bnb.BitsandbytesOptimizer().options() == {}


def test_unknown_option_suggests_the_right_one() -> None:
    with pytest.raises(ModeOptionError, match=r"does not take option 'ignore_module'.*"
                                              r"Did you mean 'ignore_modules'"):
        mixprec.registry().build("nf4", {"ignore_module": ["lm_head"]})


@pytest.mark.parametrize(
    ("mode", "options", "message"),
    [
        ("nf4", {"dtype": "fp8"}, r"Unsupported dtype 'fp8'; use one of 'bf16', '16', '32'\."),
        ("int8", {"blocksize": 64}, r"blocksize applies to the 4-bit modes only"),
        ("nf4", {"blocksize": 100}, r"blocksize=100 is not supported by bitsandbytes; use one of 32, 64"),
        ("int8", {"quant_storage": "uint8"}, r"quant_storage applies to the 4-bit modes only"),
        ("fp4", {"quant_storage": "int8"}, r"Unsupported quant_storage 'int8'; use one of 'uint8', 'bf16'"),
        ("nf4-dq", {"master_weights": True}, r"master_weights=True needs trainable weights"),
        ("int8-training", {"master_weights": True, "dtype": "32"}, r"needs 16-bit weights"),
        ("nf4", {"ignore_modules": ["lm_head", ""]}, r"ignore_modules takes dotted module names"),
    ],
)
def test_bad_precision_options_are_refused(mode: str, options: dict, message: str) -> None:
    with pytest.raises(ModeOptionError, match=message):
        mixprec.registry().build(mode, options)


def test_bad_mode_and_optimizer_options_are_refused() -> None:
    with pytest.raises(ModeOptionError, match=r"Unknown bitsandbytes precision mode 'nf3'; use one of nf4"):
        mixprec_bnb.BitsandbytesMode("nf3")
    with pytest.raises(ModeOptionError, match=r"Unknown bitsandbytes optimizer mode 'lion8bit'"):
        mixprec_bnb.BitsandbytesOptimizer("lion8bit")
    with pytest.raises(ModeOptionError, match=r"optim_32bit_modules takes torch.nn.Module types"):
        mixprec_bnb.BitsandbytesOptimizer(optim_32bit_modules=[int])
    with pytest.raises(ModeOptionError, match=r"Option min_8bit_size must be an integer >= 0, got -1"):
        mixprec_bnb.BitsandbytesOptimizer(min_8bit_size=-1)


def test_public_names() -> None:
    assert mixprec_bnb.__all__ == sorted(mixprec_bnb.__all__)
    for name in mixprec_bnb.__all__:
        assert getattr(mixprec_bnb, name) is not None
    with pytest.raises(AttributeError):
        mixprec_bnb.nothing  # noqa: B018
