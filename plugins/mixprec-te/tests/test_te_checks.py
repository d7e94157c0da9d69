"""Clear errors before anything changes: TE missing or broken, not a CUDA device, a GPU
without FP8, bad options."""

from __future__ import annotations

import pytest
import torch
from _te_testing import Net
from mixprec_te import TransformerEngineMode
from mixprec_te._hardware import check_cuda_device, check_fp8_capability
from mixprec_te._te import fp8_support

import mixprec
from mixprec.exceptions import MissingDependencyError, ModeOptionError, UnsupportedDeviceError


def snapshot(model, opt):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        [(n, id(p), p.dtype, p.detach().clone()) for n, p in model.named_parameters()],
        [[id(p) for p in g["params"]] for g in opt.param_groups],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def assert_unchanged(before, after):
    assert before[0] == after[0] and before[2] == after[2]
    for (n, i, d, v), (n2, i2, d2, v2) in zip(before[1], after[1]):
        assert (n, i, d) == (n2, i2, d2) and torch.equal(v, v2)
    assert before[3].keys() == after[3].keys()


@pytest.mark.parametrize("mode", ["transformer-engine", "transformer-engine-float16"])
def test_missing_te_names_the_pip_package_and_changes_nothing(no_te, fresh_registry, net, mode):
    opt = torch.optim.AdamW(net.parameters())
    before = snapshot(net, opt)
    with pytest.raises(MissingDependencyError) as info:
        mixprec.wrap(net, opt, mode=mode)
    assert info.value.package == "transformer-engine[pytorch]"
    assert str(info.value) == (
        f"Mode {mode!r} needs NVIDIA Transformer Engine, which is not installed; on a CUDA "
        'machine run: pip install --no-build-isolation "transformer-engine[pytorch]"')
    assert_unchanged(before, snapshot(net, opt))
    assert not mixprec.is_wrapped(net)


def test_a_te_that_cannot_load_says_so(broken_te, net):
    with pytest.raises(MissingDependencyError) as info:
        mixprec.wrap(net, mode=TransformerEngineMode("bf16"))
    message = str(info.value)
    assert "installed but cannot be loaded (OSError: libcuda.so.1: cannot open shared object" in message
    assert message.endswith('reinstall it with pip install --no-build-isolation "transformer-engine[pytorch]"')


@pytest.mark.parametrize("mode", ["transformer-engine", "transformer-engine-float16"])
def test_a_cpu_model_is_refused_before_anything_changes(te, fresh_registry, net, mode):
    opt = torch.optim.AdamW(net.parameters())
    before = snapshot(net, opt)
    with pytest.raises(UnsupportedDeviceError) as info:
        mixprec.wrap(net, opt, mode=mode)
    assert str(info.value).startswith(
        f"Mode {mode!r} runs FP8 through Transformer Engine on NVIDIA GPUs only, but the model "
        "is on 'cpu'; move it to a CUDA device (model.cuda()) before wrapping")
    assert info.value.device == torch.device("cpu")
    assert_unchanged(before, snapshot(net, opt))


def test_recipe_errors_come_before_any_change(te_legacy, net):
    opt = torch.optim.AdamW(net.parameters())
    before = snapshot(net, opt)
    with pytest.raises(ModeOptionError, match="Float8CurrentScaling"):
        mixprec.wrap(net, opt, mode=TransformerEngineMode("bf16", recipe={"scaling": "current"}))
    assert_unchanged(before, snapshot(net, opt))


def test_cuda_device_without_cuda_in_torch(te):
    with pytest.raises(UnsupportedDeviceError, match=r"torch .* sees none \(torch.cuda.is_available\(\) is False\)"):
        check_cuda_device(torch.device("cuda", 0), "transformer-engine")


@pytest.mark.parametrize(("capability", "gpu"), [((8, 0), "NVIDIA A100-SXM4-80GB"),
                                                  ((8, 6), "NVIDIA RTX A6000"),
                                                  ((7, 0), "Tesla V100-SXM2-16GB")])
def test_gpus_without_fp8_tensor_cores_are_refused(te, capability, gpu):
    with pytest.raises(UnsupportedDeviceError) as info:
        check_fp8_capability(capability, gpu, "cuda:0", "transformer-engine")
    assert str(info.value) == (
        "Mode 'transformer-engine' needs a GPU with FP8 tensor cores (compute capability 8.9 or "
        f"higher: Ada, Hopper, Blackwell), but {gpu} (cuda:0) has {capability[0]}.{capability[1]}; "
        "use 'bf16-mixed' on this GPU.")


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0), (12, 0)])
def test_fp8_gpus_pass(te, capability):
    check_fp8_capability(capability, "GPU", "cuda:0", "transformer-engine", (True, ""))


def test_te_verdict_is_reported(te):
    verdict = (False, "CublasLt version 12.1.3.x or higher required for FP8 execution on Ada.")
    with pytest.raises(UnsupportedDeviceError) as info:
        check_fp8_capability((8, 9), "NVIDIA L4", "cuda:0", "transformer-engine", verdict)
    assert str(info.value) == (
        "Transformer Engine 2.20.0+standin cannot run FP8 on NVIDIA L4 (cuda:0): CublasLt version "
        "12.1.3.x or higher required for FP8 execution on Ada; update what it names, or use "
        "'bf16-mixed' on this machine.")


def test_fp8_support_through_either_te_api(te, te_legacy):
    import _te_standin

    for module in (te, te_legacy):
        _te_standin.FP8GlobalStateManager.SUPPORT = (False, "Device compute capability 8.9 or higher required for FP8 execution.")
        assert fp8_support(module) == _te_standin.FP8GlobalStateManager.SUPPORT
        _te_standin.FP8GlobalStateManager.SUPPORT = (True, "")
        assert fp8_support(module) == (True, "")


def test_init_module_refuses_a_cpu_device_and_restores_the_dtype(te):
    with pytest.raises(UnsupportedDeviceError, match="model is on 'cpu'"):
        with mixprec.init_module(TransformerEngineMode("bf16"), device="cpu"):
            pass
    assert torch.get_default_dtype() is torch.float32
    assert torch.nn.Linear.__module__ == "torch.nn.modules.linear" and type(torch.nn.Linear) is type


def test_init_module_without_te(no_te):
    with pytest.raises(MissingDependencyError, match="not installed"):
        with mixprec.init_module(TransformerEngineMode("bf16"), device="meta"):
            pass


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weights_dtype": "fp32"}, "Unsupported weights_dtype 'fp32'; use one of 'bf16', '16'."),
    ({"fallback_dtype": "int8"}, "Unsupported fallback_dtype 'int8'; use one of 'bf16', '16', '32'."),
    ({"weights_dtype": "fp16", "master_weights": False},
     "transformer-engine-float16 needs master_weights (fp32 copies for the optimizer)"),
    ({"init_scale": 1024.0}, "Loss-scaler options (init_scale) apply only to 'transformer-engine-float16'"),
    ({"weights_dtype": "fp16", "init_scal": 1.0}, "does not take option(s) 'init_scal'"),
    ({"weights_dtype": "fp16", "backoff_factor": 2.0}, "backoff_factor must be in (0, 1)"),
    ({"ignore_modules": ["head", 3]}, "ignore_modules takes dotted module names or globs such as 'lm_head' or 'blocks.*.attn'; got 3."),
    ({"replace_layers": "yes"}, "Option replace_layers takes True or False, got 'yes'; pass a bool"),
])
def test_bad_mode_options(kwargs, message):
    with pytest.raises(ModeOptionError) as info:
        TransformerEngineMode(**kwargs)
    assert message in str(info.value)


def test_options_are_plain_and_minimal():
    assert TransformerEngineMode("bf16").options() == {"recipe": {"scaling": "delayed"}}
    mode = TransformerEngineMode("fp16", recipe={"amax_history_len": 16}, ignore_modules="head",
                                 fallback_dtype="fp32", init_scale=256.0)
    assert mode.options() == {"recipe": {"scaling": "delayed", "amax_history_len": 16},
                              "fallback_dtype": "float32", "ignore_modules": ["head"],
                              "init_scale": 256.0}
    assert mode.name == "transformer-engine-float16" and mode.master_weights and mode.needs_scaling
    bf16 = TransformerEngineMode("bf16", master_weights=True)
    assert bf16.options()["master_weights"] is True and bf16.create_scaler() is None


def test_layer_plan_changes_nothing(net):
    before = [type(m) for m in net.modules()]
    plan = TransformerEngineMode("bf16").layer_plan(net)
    assert [d.name for d in plan.to_convert] == ["norm", "mlp.0", "mlp.2", "rms"]
    assert [type(m) for m in net.modules()] == before
    assert isinstance(Net(), torch.nn.Module)
