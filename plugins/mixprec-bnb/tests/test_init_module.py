"""init_module: Linear layers quantized as they are built, or on meta and quantized on load."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyLM, make_lm, train, wrap_quiet
from mixprec_bnb import BitsandbytesMode, QuantLinear4bit, QuantLinear8bit

import mixprec
from mixprec.exceptions import WrapError
from mixprec.testing import assert_state_equal
from mixprec.testing import checkpoint_roundtrip as roundtrip

REAL_LINEAR = torch.nn.Linear


def _quantized(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (QuantLinear4bit, QuantLinear8bit))]


@pytest.mark.parametrize("mode", ["nf4-dq", "fp4", "int8"])
def test_layers_are_quantized_as_they_are_built(mode: str) -> None:
    mode = BitsandbytesMode(mode, quantize_lm_head=True)  # every layer: the values compare
    with mixprec.init_module(mode) as precision:
        torch.manual_seed(0)
        model = TinyLM()
    assert torch.nn.Linear is REAL_LINEAR
    assert _quantized(model) == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down",
                                 "lm_head"]
    cls = QuantLinear4bit if mode.name != "int8" else QuantLinear8bit
    assert {type(m) for n, m in model.named_modules() if n in _quantized(model)} == {cls}
    assert model.emb.weight.dtype == torch.float32
    # the same initial values as quantizing a model built normally with the same seed
    reference = wrap_quiet(make_lm(0), None, mode)
    assert_state_equal(model.state_dict(), reference.state_dict())
    wrapped = precision.wrap(model)
    assert "kept 5 layers mixprec quantized before (in init_module" in wrapped.precision.summary
    assert "quantized 5 Linear layers" in wrapped.precision.summary
    tokens = torch.randint(0, 64, (2, 8))
    assert torch.equal(wrapped(tokens), reference(tokens))


def test_ignore_modules_apply_in_init_module() -> None:
    mode = BitsandbytesMode("nf4-dq", ignore_modules={"lm_head", "blocks.1.down"})
    with mixprec.init_module(mode) as precision:
        model = TinyLM()
    assert _quantized(model) == ["blocks.0.up", "blocks.0.down", "blocks.1.up"]
    for name in ("lm_head", "blocks.1.down"):
        layer = model.get_submodule(name)
        assert type(layer) is REAL_LINEAR and layer.weight.dtype == torch.float32
        assert layer.weight.requires_grad
    wrapped = precision.wrap(model)
    assert "left in full precision (ignore_modules): blocks.1.down, lm_head" in \
        wrapped.precision.summary


def test_unmatched_ignore_pattern_warns_in_init_module() -> None:
    with pytest.warns(mixprec.MixprecWarning, match=r"ignore_modules \['head'\] matched no module "
                                                     r"built in init_module"):
        with mixprec.init_module(BitsandbytesMode("nf4", ignore_modules="head")):
            TinyLM()


def test_meta_then_full_precision_checkpoint_quantizes_on_load() -> None:
    dense = make_lm(3).state_dict()
    mode = BitsandbytesMode("nf4-dq", ignore_modules="lm_head")
    with mixprec.init_module(mode, device="meta") as precision:
        model = TinyLM()
    assert all(p.is_meta for p in model.parameters())
    assert type(model.lm_head) is REAL_LINEAR
    result = model.load_state_dict(dense, assign=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.lm_head.weight, dense["lm_head.weight"])
    reference = wrap_quiet(make_lm(3), None, mode)
    assert_state_equal(model.state_dict(), reference.state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped, wopt = precision.wrap(model, opt)  # nothing left to freeze: no warning
    losses = train(wrapped, wopt, 10)
    assert losses[-1] < losses[0]


def test_meta_then_quantized_checkpoint_takes_it_as_it_is() -> None:
    source = wrap_quiet(make_lm(4), None, "int8")
    saved = roundtrip(source.state_dict())
    with mixprec.init_module("int8", device="meta") as precision:
        model = TinyLM()
    model.load_state_dict(saved, assign=True)
    assert_state_equal(model.state_dict(), source.state_dict())
    wrapped = precision.wrap(model)
    tokens = torch.randint(0, 64, (2, 8))
    assert torch.equal(wrapped(tokens), source(tokens))


def test_unloaded_meta_layers_cannot_run_or_be_wrapped() -> None:
    with mixprec.init_module("nf4", device="meta") as precision:
        model = TinyLM()
    with pytest.raises(RuntimeError, match=r"holds no weights yet \(it was built on the meta "
                                           r"device\); load a state dict"):
        model.blocks[0].up(torch.zeros(1, 64, device="meta"))
    with pytest.raises(WrapError, match=r"meta device; load its weights first"):
        precision.wrap(model)


def test_linear_is_restored_when_the_block_raises() -> None:
    with pytest.raises(ValueError, match="boom"):
        with mixprec.init_module("nf4"):
            assert torch.nn.Linear is not REAL_LINEAR
            raise ValueError("boom")
    assert torch.nn.Linear is REAL_LINEAR


def test_wrapping_init_layers_in_another_mode_is_refused() -> None:
    with mixprec.init_module("nf4"):
        model = TinyLM()
    with pytest.raises(WrapError, match=r"Layer 'blocks.0.up' was quantized as nf4 \(blocksize "
                                        r"64, bfloat16\) but this mode is fp4"):
        mixprec.wrap(model, None, "fp4")
    with pytest.raises(WrapError, match=r"Layer 'blocks.0.up' is already quantized but matches "
                                        r"ignore_modules"):
        mixprec.wrap(model, None, BitsandbytesMode("nf4", ignore_modules="blocks.0.up"))
