"""A quantized layer is as accurate as bitsandbytes' own functional quantize/dequantize."""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import mixprec_bnb._layers
import pytest
import torch
from conftest import wrap_quiet
from mixprec_bnb import BitsandbytesMode

OUT, IN = 96, 256


def _data(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(IN, OUT)
    return linear, torch.randn(32, IN)


def _rel_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.float() - exact).norm() / exact.norm())


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "fp4", "fp4-dq"])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_4bit_layer_matches_functional_dequantize(mode: str, blocksize: int) -> None:
    linear, x = _data()
    exact = linear(x).detach()
    weight = linear.weight.detach().clone()
    q, qs = bnbF.quantize_4bit(weight, blocksize=blocksize, quant_type=mode[:3],
                               compress_statistics=mode.endswith("-dq"))
    dequantized = bnbF.dequantize_4bit(q, qs)
    reference = torch.nn.functional.linear(x, dequantized, linear.bias.detach())
    ref_error = _rel_error(reference, exact)
    assert 0.01 < ref_error < 0.2  # 4-bit weights are visibly lossy, and not broken

    seq = torch.nn.Sequential(linear)
    wrapped = wrap_quiet(seq, None, BitsandbytesMode(mode, dtype="32", blocksize=blocksize))
    layer = wrapped.module[0]
    assert torch.equal(layer.weight.data, q)
    assert torch.equal(bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                       dequantized)
    with torch.no_grad():
        out = wrapped(x)
    assert _rel_error(out, exact) <= ref_error * (1 + 1e-5)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)

    # bf16 compute adds only bf16 rounding of the activations on top
    bf16 = wrap_quiet(torch.nn.Sequential(_data()[0]), None,
                      BitsandbytesMode(mode, blocksize=blocksize))
    with torch.no_grad():
        out16 = bf16(x)
    ref16 = torch.nn.functional.linear(x.bfloat16(), dequantized.bfloat16(),
                                       linear.bias.detach().bfloat16())
    assert _rel_error(out16, exact) <= _rel_error(ref16, exact) * 1.05
    assert out16.dtype == torch.float32


@pytest.mark.parametrize("training", [True, False])
def test_int8_layer_matches_functional_dequantize(training: bool) -> None:
    linear, x = _data()
    exact = linear(x).detach()
    cb, scb, _ = bnbF.int8_vectorwise_quant(linear.weight.detach().to(torch.float16))
    dequantized = bnbF.int8_vectorwise_dequant(cb, scb)
    reference = torch.nn.functional.linear(x, dequantized.float(), linear.bias.detach())
    ref_error = _rel_error(reference, exact)
    assert 1e-4 < ref_error < 0.02

    wrapped = wrap_quiet(torch.nn.Sequential(linear), None, BitsandbytesMode("int8", dtype="32"))
    layer = wrapped.module[0]
    assert torch.equal(layer.weight.data, cb) and torch.equal(layer.weight.SCB, scb)
    wrapped.train(training)
    with torch.no_grad():
        out = wrapped(x)
    assert _rel_error(out, exact) <= ref_error * (1 + 1e-5)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_int8_training_gradients_match_a_dense_layer() -> None:
    linear, x = _data()
    wrapped = wrap_quiet(torch.nn.Sequential(_data()[0]), None,
                         BitsandbytesMode("int8-training", dtype="32"))
    layer = wrapped.module[0]
    out = wrapped(x)
    out.square().sum().backward()
    ref = linear(x)
    ref.square().sum().backward()
    assert _rel_error(out.detach(), ref.detach()) < 0.01  # int8-rounded forward
    # the weight gradient is exact for the (int8) forward it saw
    expected = (2 * out.detach()).t() @ x
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-4, atol=1e-3)
    assert _rel_error(layer.weight.grad, linear.weight.grad) < 0.02


@pytest.mark.parametrize(("mode", "shape", "storage"), [
    ("nf4-dq", (96, 256), "uint8"), ("fp4", (96, 250), "uint8"), ("nf4", (64, 512), "float32"),
])
def test_chunked_quantization_is_bit_identical_to_one_call(
        monkeypatch: pytest.MonkeyPatch, mode: str, shape: tuple[int, int], storage: str) -> None:
    """Layers are quantized a chunk at a time to bound the temporaries (bitsandbytes'
    CPU path copies its input several times); the result must not change."""
    monkeypatch.setattr(mixprec_bnb._layers, "CHUNK_ELEMENTS", 4096)
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0])
    q, qs = bnbF.quantize_4bit(linear.weight.detach(), blocksize=64, quant_type=mode[:3],
                               compress_statistics=mode.endswith("-dq"),
                               quant_storage=getattr(torch, storage))
    wrapped = wrap_quiet(torch.nn.Sequential(linear), None,
                         BitsandbytesMode(mode, quant_storage=storage))
    weight = wrapped.module[0].weight
    assert weight.dtype == q.dtype == getattr(torch, storage)
    assert torch.equal(weight.data.view(torch.uint8), q.view(torch.uint8))  # bytes: NaN != NaN
    for key, value in qs.as_dict(packed=True).items():
        assert torch.equal(weight.quant_state.as_dict(packed=True)[key], value), key


def test_chunked_int8_quantization_is_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mixprec_bnb._layers, "CHUNK_ELEMENTS", 1000)
    linear, _ = _data()
    cb, scb, _ = bnbF.int8_vectorwise_quant(linear.weight.detach().to(torch.float16))
    layer = wrap_quiet(torch.nn.Sequential(linear), None, "int8").module[0]
    assert torch.equal(layer.weight.data, cb) and torch.equal(layer.weight.SCB, scb)
