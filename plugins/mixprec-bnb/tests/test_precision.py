"""Wrapping: which layers are swapped, what is frozen, the optimizer remap, byte counts."""

from __future__ import annotations

import math

import pytest
import torch
from bitsandbytes.nn import Int8Params, Linear4bit, Params4bit
from conftest import TinyLM, make_lm, train, wrap_quiet
from mixprec_bnb import BitsandbytesMode, QuantLinear4bit, QuantLinear8bit

import mixprec
from mixprec.exceptions import UnsupportedDeviceError, WrapError

FOUR_BIT = ["nf4", "nf4-dq", "fp4", "fp4-dq"]
FROZEN = [*FOUR_BIT, "int8"]
LINEARS = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "lm_head"]


def _linear_names(model: torch.nn.Module, cls: type) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


@pytest.mark.parametrize("mode", FROZEN)
def test_frozen_modes_swap_layers_freeze_weights_and_warn(mode: str) -> None:
    model = make_lm()
    before = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(mixprec.MixprecWarning, match=(
            rf"Mode '{mode}' froze 5 Linear weights that required grad \(blocks.0.up.weight, "
            r".*lm_head.weight\): quantized weights cannot train. Train LoRA adapters")):
        wrapped, wopt = mixprec.wrap(model, opt, mode, quantize_lm_head=True)
    cls = QuantLinear4bit if mode in FOUR_BIT else QuantLinear8bit
    assert _linear_names(wrapped, cls) == LINEARS
    assert _linear_names(wrapped, torch.nn.Linear) == LINEARS  # still Linear subclasses
    for name in LINEARS:
        layer = wrapped.get_submodule(name)
        assert not layer.weight.requires_grad
        assert isinstance(layer.weight, Params4bit if mode in FOUR_BIT else Int8Params)
        assert layer.weight.dtype == (torch.uint8 if mode in FOUR_BIT else torch.int8)
        assert layer.bias is before[f"{name}.bias"]  # same parameter object, still fp32
        assert layer.bias.dtype == torch.float32 and layer.bias.requires_grad
    # everything else untouched, same objects
    for name, p in wrapped.named_parameters():
        if not name.endswith("weight") or not any(name.startswith(n) for n in LINEARS):
            assert p is before[name] and p.dtype == torch.float32 and p.requires_grad
    summary = wopt.precision.summary
    assert f"quantized 5 Linear layers ({mode}" in summary
    assert "frozen by quantization: 5 weights that required grad" in summary
    # optimizer remap: the frozen weights left it, nothing stale remains
    in_opt = {id(p) for g in wopt.param_groups for p in g["params"]}
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    assert in_opt == {id(p) for p in trainable}
    assert "optimizer: 5 frozen or removed parameters left it: blocks.0.up.weight" in summary
    assert all(id(p) in in_opt for p in wopt.state)


def test_remap_keeps_state_of_kept_parameters_and_drops_the_rest() -> None:
    model = make_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, opt, 1)
    bias = model.blocks[0].up.bias
    bias_state = {k: v.clone() for k, v in opt.state[bias].items()}
    old_weight = model.blocks[0].up.weight
    wrapped, wopt = wrap_quiet(model, opt, "nf4")
    assert old_weight not in wopt.state
    assert len(wopt.state) == len([p for p in wrapped.parameters() if p.requires_grad])
    for key, value in bias_state.items():
        assert torch.equal(wopt.state[bias][key], value)
    losses = train(wrapped, wopt, 3, start=1)
    assert all(math.isfinite(v) for v in losses)


def test_forward_hooks_and_train_flag_carry_over() -> None:
    model = make_lm()
    model.blocks[0].up.eval()
    seen: list[tuple[int, ...]] = []
    model.blocks[0].up.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    model.blocks[0].up.register_forward_pre_hook(lambda m, args: (args[0] * 0,))
    wrapped = wrap_quiet(model, None, "nf4")
    layer = wrapped.blocks[0].up
    assert isinstance(layer, QuantLinear4bit) and not layer.training
    out = layer(torch.randn(2, 64))
    assert seen == [(2, 128)]
    assert torch.equal(out, layer.bias.expand(2, -1).to(torch.bfloat16).float())


def test_no_warning_when_nothing_that_trained_is_frozen() -> None:
    model = make_lm()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.bias.requires_grad_(True)
    opt = torch.optim.AdamW([model.lm_head.bias], lr=1e-3)
    _, wopt = mixprec.wrap(model, opt, "nf4-dq")  # filterwarnings=error: none raised
    assert "frozen by quantization" not in wopt.precision.summary


def test_int8_training_keeps_trainable_half_weights_in_the_optimizer() -> None:
    model = make_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    wrapped, wopt = mixprec.wrap(model, opt, "int8-training", quantize_lm_head=True)
    layer = wrapped.blocks[0].up
    assert isinstance(layer, QuantLinear8bit)
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.requires_grad
    in_opt = {id(p) for g in wopt.param_groups for p in g["params"]}
    assert id(layer.weight) in in_opt
    assert "optimizer: 5 parameters remapped to their converted tensors" in wopt.precision.summary
    before = layer.weight.detach().clone()
    losses = train(wrapped, wopt, 12)
    assert not torch.equal(layer.weight, before)
    assert losses[-1] < losses[0]


def test_int8_training_in_fp16_gets_fp32_masters_and_trains_without_nan() -> None:
    """A torch Adam step on fp16 weights goes NaN (eps=1e-8 is 0 in fp16): fp16
    int8-training keeps fp32 masters unless told otherwise."""
    model = make_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    wrapped, wopt = mixprec.wrap(model, opt, "int8-training", dtype=torch.float16)
    assert wrapped.blocks[0].up.weight.dtype == torch.float16
    assert "fp32 master weights" in wopt.precision.summary
    assert all(p.dtype == torch.float32 for g in wopt.param_groups for p in g["params"])
    losses = train(wrapped, wopt, 12)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert wopt.precision.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in wrapped.parameters())


def test_int8_training_requantizes_after_every_step_even_with_zeroed_grads() -> None:
    """bitsandbytes reuses its int8 copy while ``weight.grad`` is not None; zero_grad
    (set_to_none=False) would then run every later forward on stale weights."""
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(64, 64))
    wrapped = mixprec.wrap(seq, mode="int8-training")
    x = torch.randn(4, 64)
    first = wrapped(x)
    first.sum().backward()  # weight.grad now exists
    with torch.no_grad():
        wrapped.module[0].weight.mul_(-1)
    flipped = wrapped(x)
    bias = wrapped.module[0].bias
    torch.testing.assert_close(flipped - bias, -(first - bias), atol=0.05, rtol=0.02)


def test_int8_training_takes_3d_inputs() -> None:
    """bitsandbytes' Linear8bitLt with trainable weights fails on 3-D inputs on the CPU."""
    torch.manual_seed(0)
    wrapped = mixprec.wrap(torch.nn.Sequential(torch.nn.Linear(64, 32)), mode="int8-training")
    x = torch.randn(2, 3, 64, requires_grad=True)
    out = wrapped(x)
    assert out.shape == (2, 3, 32) and out.dtype == torch.float32
    out.square().sum().backward()
    flat = torch.randn(6, 64)
    flat.copy_(x.detach().reshape(6, 64))
    torch.testing.assert_close(wrapped(flat).reshape(2, 3, 32), out.detach())
    assert x.grad is not None and wrapped.module[0].weight.grad.shape == (32, 64)


@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_return_the_input_dtype_and_never_recast_the_bias(mode: str,
                                                                  dtype: torch.dtype) -> None:
    wrapped = wrap_quiet(make_lm(), None, mode)
    layer = wrapped.blocks[0].up
    assert layer.compute_dtype == torch.bfloat16
    x = torch.randn(3, 5, 64, dtype=dtype)
    for training in (True, False):
        layer.train(training)
        assert layer(x).dtype == dtype
    assert layer.bias.dtype == torch.float32  # bitsandbytes' own layers cast it in place


def test_inference_forward_on_cpu_leaves_the_weights_alone() -> None:
    """bitsandbytes' Linear4bit repacks its weight for AVX512-BF16 CPUs on the first
    inference forward (bf16 constants, double quantization undone)."""
    wrapped = wrap_quiet(make_lm(), None, "nf4-dq").eval()
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    with torch.no_grad():
        wrapped(torch.randint(0, 64, (1, 4)))
    layer = wrapped.blocks[0].up
    assert layer.weight.quant_state.nested and layer.weight.quant_state.absmax.dtype == torch.uint8
    for key, value in wrapped.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_compute_dtype_option() -> None:
    wrapped = wrap_quiet(make_lm(), None, "nf4", dtype="32")
    assert wrapped.blocks[0].up.compute_dtype == torch.float32
    assert "compute float32" in wrapped.precision.summary


# -- byte counts ------------------------------------------------------------------------


def _layer(out_f: int, in_f: int, mode: str) -> QuantLinear4bit | QuantLinear8bit:
    torch.manual_seed(0)
    wrapped = wrap_quiet(torch.nn.Sequential(torch.nn.Linear(in_f, out_f)), None, mode)
    return wrapped.module[0]


@pytest.mark.parametrize("mode", FOUR_BIT)
def test_4bit_bytes_per_weight(mode: str) -> None:
    out_f, in_f = 256, 512
    n = out_f * in_f
    layer = _layer(out_f, in_f, mode)
    qs = layer.weight.quant_state
    data = layer.weight.data.untyped_storage().nbytes()
    absmax = qs.absmax.untyped_storage().nbytes()
    assert data == n // 2  # two 4-bit values per byte
    if mode.endswith("-dq"):
        nested = qs.state2.absmax.untyped_storage().nbytes() + qs.offset.untyped_storage().nbytes()
        assert absmax == n // 64  # one uint8 constant per 64 weights
        assert nested == 4 * math.ceil(n / 64 / 256) + 4  # fp32 per 256 constants, one offset
        per_weight = (data + absmax + nested) / n
        assert per_weight == (n // 2 + n // 64 + 4 * (n // 64 // 256) + 4) / n
        assert per_weight <= 0.52
        assert qs.code.numel() * 4 + qs.state2.code.numel() * 4 == 64 + 1024  # code books
    else:
        assert absmax == 4 * n // 64  # one fp32 constant per 64 weights
        per_weight = (data + absmax) / n
        assert per_weight == 0.5625
        assert qs.code.numel() * 4 == 64
    assert layer.storage_nbytes()[0] == round(per_weight * n)


def test_4bit_blocksize_changes_the_constants() -> None:
    torch.manual_seed(0)
    wrapped = wrap_quiet(torch.nn.Sequential(torch.nn.Linear(256, 64)), None,
                         BitsandbytesMode("nf4", blocksize=256))
    qs = wrapped.module[0].weight.quant_state
    assert qs.blocksize == 256 and qs.absmax.numel() == 64 * 256 // 256


def test_4bit_quant_storage_option() -> None:
    torch.manual_seed(0)
    wrapped = wrap_quiet(torch.nn.Sequential(torch.nn.Linear(64, 32)), None,
                         BitsandbytesMode("nf4", quant_storage="bfloat16"))
    weight = wrapped.module[0].weight
    assert weight.dtype == torch.bfloat16 and weight.data.untyped_storage().nbytes() == 32 * 64 // 2
    out = wrapped(torch.randn(2, 64))
    assert out.shape == (2, 32) and torch.isfinite(out).all()


def test_int8_bytes_per_weight() -> None:
    out_f, in_f = 256, 512
    layer = _layer(out_f, in_f, "int8")
    data = layer.weight.data.untyped_storage().nbytes()
    scales = layer.weight.SCB.untyped_storage().nbytes()
    assert data == out_f * in_f and scales == 4 * out_f  # int8 + one fp32 scale per row
    assert (data + scales) / (out_f * in_f) == 1 + 4 / in_f <= 1.01


def test_int8_training_stores_two_bytes_per_weight() -> None:
    layer = _layer(256, 512, "int8-training")
    assert layer.weight.data.untyped_storage().nbytes() == 2 * 256 * 512


# -- selection and errors ---------------------------------------------------------------


def test_ignore_modules_by_prefix_and_glob() -> None:
    wrapped = wrap_quiet(make_lm(), None, BitsandbytesMode(
        "nf4", ignore_modules={"lm_head", "blocks.*.down"}))
    assert _linear_names(wrapped, QuantLinear4bit) == ["blocks.0.up", "blocks.1.up"]
    head = wrapped.lm_head
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    assert head.weight.requires_grad
    assert ("left in full precision (ignore_modules): blocks.0.down, blocks.1.down, lm_head"
            in wrapped.precision.summary)
    # a parent's name selects everything inside it; a partial name selects nothing
    wrapped = wrap_quiet(make_lm(), None, BitsandbytesMode("nf4", ignore_modules="blocks.0",
                                                           quantize_lm_head=True))
    assert _linear_names(wrapped, QuantLinear4bit) == ["blocks.1.up", "blocks.1.down", "lm_head"]
    with pytest.raises(WrapError, match=r"pattern 'lm_hea' matches no module of the model; "
                                        r"did you mean 'lm_head'\?"):
        mixprec.wrap(make_lm(), None, BitsandbytesMode("nf4", ignore_modules="lm_hea"))


def _snapshot(model: torch.nn.Module) -> list[tuple[str, type, int, torch.dtype, bool]]:
    return [(n, type(m), id(p), p.dtype, p.requires_grad)
            for n, m in model.named_modules() for p in m.parameters(recurse=False)]


@pytest.mark.parametrize(
    ("mode", "make", "error", "message"),
    [
        (BitsandbytesMode("nf4", ignore_modules=["lm_head", "blocks"]), make_lm, WrapError,
         r"found no torch.nn.Linear layer to quantize \(all 5 are excluded: ignore_modules, the "
         r"output layer \(quantize_lm_head=True quantizes it\), _keep_in_fp32_modules, tied "
         r"weights, subclasses, empty layers or \(int8-training\) Conv1D layers\)"),
        ("nf4", lambda: torch.nn.Sequential(torch.nn.LayerNorm(4)), WrapError,
         r"found no torch.nn.Linear layer to quantize \(it has none\); wrap the model in a mode"),
        ("int8", lambda: torch.nn.Linear(8, 8), WrapError,
         r"The model itself is a Linear, which cannot be replaced in place"),
        ("nf4", lambda: torch.nn.Sequential(Linear4bit(8, 8)), WrapError,
         r"Layer '0' is a bitsandbytes Linear4bit without quantized weights"),
    ],
)
def test_predictable_errors_come_before_any_change(mode: object, make: object, error: type,
                                                    message: str) -> None:
    model = make()  # type: ignore[operator]
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        mixprec.wrap(model, None, mode)
    assert _snapshot(model) == before
    assert not mixprec.is_wrapped(model)


def test_meta_model_is_refused() -> None:
    with torch.device("meta"):
        model = TinyLM()
    with pytest.raises(WrapError, match=r"on the meta device; load its weights first with "
                                        r"model.load_state_dict\(state_dict, assign=True\)"):
        mixprec.wrap(model, None, "nf4")


def test_compute_dtype_defaults_per_device() -> None:
    bf16, fp16 = torch.bfloat16, torch.float16
    assert BitsandbytesMode("nf4").config("cpu").compute_dtype == bf16
    assert BitsandbytesMode("int8-training").config("cpu").compute_dtype == bf16
    assert BitsandbytesMode("int8").config("cuda").compute_dtype == fp16  # int8 kernels: fp16
    gpu_bf16 = torch.cuda.is_bf16_supported()  # False with a CPU-only torch
    assert BitsandbytesMode("nf4").config("cuda").compute_dtype == (bf16 if gpu_bf16 else fp16)
    if not gpu_bf16:
        with pytest.raises(UnsupportedDeviceError, match=r"does not support bfloat16; build the "
                                                         r"mode with dtype='16'"):
            BitsandbytesMode("nf4", dtype="bf16").config("cuda")


def test_linear_subclasses_and_shared_layers() -> None:
    """MultiheadAttention reads out_proj.weight directly: its Linear subclass is left alone.
    A Linear registered under two names becomes one quantized layer in both places."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(16, 16)
    model = torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(16, 2),
                                 "a": shared, "b": torch.nn.Sequential(shared)})
    wrapped = wrap_quiet(model, None, "nf4")
    assert type(wrapped.attn.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(wrapped.a, QuantLinear4bit) and wrapped.b[0] is wrapped.a
    assert "left alone (torch.nn.Linear subclasses" in wrapped.precision.summary
    x = torch.randn(3, 1, 16)
    out, _ = wrapped.attn(x, x, x)
    assert out.shape == (3, 1, 16)


def test_a_linear_tied_to_the_embedding_stays_full_precision() -> None:
    """Quantizing a head that shares its weight with the embedding would split the two."""
    model = make_lm()
    model.lm_head.weight = model.emb.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wrapped, wopt = wrap_quiet(model, opt, "nf4-dq+adamw8bit", quantize_lm_head=True)
    assert type(wrapped.lm_head) is torch.nn.Linear
    assert wrapped.lm_head.weight is wrapped.emb.weight and wrapped.emb.weight.requires_grad
    assert ("left in full precision (weight tied to another module, e.g. the embedding): "
            "lm_head" in wopt.precision.summary)
    train(wrapped, wopt, 2)
    assert wopt.state[wrapped.emb.weight]["state1"].dtype == torch.float32


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")
@pytest.mark.parametrize("mode", ["nf4", "int8", "int8-training"])
def test_empty_linear_layers_are_left_alone(mode: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 0), torch.nn.Linear(0, 64),
                                torch.nn.Linear(64, 64))
    wrapped = wrap_quiet(model, None, mode)
    assert [type(m).__name__ for m in wrapped.module] == ["Linear", "Linear",
                                                          "QuantLinear4bit" if mode == "nf4"
                                                          else "QuantLinear8bit"]
    assert "left alone (no weights to quantize): 0, 1" in wrapped.precision.summary
    assert wrapped(torch.randn(2, 8)).shape == (2, 64)


def test_a_small_model_trains_its_unquantized_parameters() -> None:
    model = make_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    wrapped, wopt = wrap_quiet(model, opt, BitsandbytesMode("nf4-dq", ignore_modules="lm_head"))
    losses = train(wrapped, wopt, 30)
    assert losses[-1] < 0.9 * losses[0]
    assert all(not p.requires_grad for n, p in wrapped.named_parameters() if "blocks" in n
               and n.endswith("weight") and "norm" not in n)
