"""QLoRA with peft, in both orders: adapters then wrap, and wrap then adapters."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import TinyLM, lm_loss, make_lm, train, wrap_quiet
from mixprec_bnb import BitsandbytesMode, QuantLinear4bit, QuantLinear8bit
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

import mixprec
from mixprec.testing import assert_state_equal
from mixprec.testing import checkpoint_roundtrip as roundtrip

TARGETS = ["up", "down"]


def _lora(model: torch.nn.Module) -> peft.PeftModel:
    torch.manual_seed(11)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))


def _adapter_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def test_adapters_first_then_wrap_quantizes_only_the_base_layers() -> None:
    model = _lora(make_lm())
    opt = torch.optim.AdamW(_adapter_params(model), lr=1e-2)
    wrapped, wopt = mixprec.wrap(model, opt, "nf4-dq+adamw8bit")  # base already frozen: no warning
    quantized = [n for n, m in wrapped.named_modules() if isinstance(m, QuantLinear4bit)]
    assert quantized == [f"base_model.model.blocks.{i}.{t}.base_layer"
                         for i in range(2) for t in TARGETS]
    assert type(wrapped.base_model.model.lm_head) is torch.nn.Linear  # the output layer, kept
    lora_a = wrapped.base_model.model.blocks[0].up.lora_A["default"]
    assert type(lora_a) is torch.nn.Linear and lora_a.weight.requires_grad
    assert "left alone: the adapters of 4 peft layers (trainable)" in wopt.precision.summary
    assert {id(p) for g in wopt.param_groups for p in g["params"]} == \
        {id(p) for p in _adapter_params(wrapped)}
    losses = train(wrapped, wopt, 15)
    assert losses[-1] < losses[0]
    # checkpoint: the whole wrapped pair into a fresh one
    checkpoint = roundtrip(wopt.precision.state_dict())
    fresh = _lora(make_lm(5))
    fresh_opt = torch.optim.AdamW(_adapter_params(fresh), lr=1e-2)
    fresh, fresh_opt = mixprec.wrap(fresh, fresh_opt, "nf4-dq+adamw8bit")
    fresh_opt.precision.load_state_dict(checkpoint)
    assert_state_equal(fresh.state_dict(), wrapped.state_dict())
    assert train(fresh, fresh_opt, 3, start=15) == train(wrapped, wopt, 3, start=15)


@pytest.mark.parametrize(("mode", "flag", "lora_cls", "base_cls"), [
    ("nf4-dq", "is_loaded_in_4bit", "Linear4bit", QuantLinear4bit),
    ("int8", "is_loaded_in_8bit", "Linear8bitLt", QuantLinear8bit),
])
def test_wrap_first_then_adapters_on_the_quantized_model(mode, flag, lora_cls, base_cls) -> None:
    wrapped = wrap_quiet(make_lm(), None, mode)
    assert getattr(wrapped.module, flag) is True
    peft_model = _lora(wrapped.module)  # peft edits the wrapped module in place
    layer = wrapped.blocks[0].up
    assert type(layer) is getattr(peft.tuners.lora.bnb, lora_cls)  # bitsandbytes-aware LoRA
    assert isinstance(layer.base_layer, base_cls)
    opt = torch.optim.AdamW(_adapter_params(peft_model), lr=1e-2)
    losses = train(wrapped, opt, 15)
    assert losses[-1] < losses[0]
    # adapter checkpoint (peft's own format) into a fresh quantized base
    adapters = roundtrip(get_peft_model_state_dict(peft_model))
    fresh = wrap_quiet(make_lm(), None, mode)
    fresh_peft = _lora(fresh.module)
    set_peft_model_state_dict(fresh_peft, adapters)
    tokens = torch.randint(0, 64, (2, 8))
    assert torch.equal(fresh(tokens), wrapped(tokens))
    # full checkpoint (quantized base and adapters) through the wrapped module
    full = roundtrip(wrapped.state_dict())
    other = wrap_quiet(make_lm(9), None, mode)
    _lora(other.module)
    other.load_state_dict(full)
    assert_state_equal(other.state_dict(), wrapped.state_dict())


def test_get_peft_model_on_the_wrapped_module_itself() -> None:
    mode = BitsandbytesMode("nf4-dq", quantize_lm_head=True)  # LoRA on a quantized head too
    wrapped = wrap_quiet(make_lm(), None, mode)
    torch.manual_seed(11)
    config = LoraConfig(r=8, target_modules=[*TARGETS, "lm_head"], init_lora_weights=False)
    peft_model = get_peft_model(wrapped, config)
    assert type(wrapped.module.lm_head) is peft.tuners.lora.bnb.Linear4bit
    adapters = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    fresh_mode = BitsandbytesMode("nf4-dq", quantize_lm_head=True)
    fresh = get_peft_model(wrap_quiet(make_lm(), None, fresh_mode), LoraConfig(
        r=8, target_modules=[*TARGETS, "lm_head"]))
    set_peft_model_state_dict(fresh, adapters)
    tokens = torch.randint(0, 64, (2, 8))
    assert torch.equal(fresh(tokens), peft_model(tokens))


def test_lora_on_nf4_dq_base_learns_like_on_the_fp32_base() -> None:
    """A base trained on task 0, then LoRA fine-tuned on task 1: the loss reduction on an
    nf4-dq base is within 10% of the reduction on the same base in fp32."""
    base = make_lm(0)
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    train(base, opt, 60, task=0)
    state = base.state_dict()

    def finetune(mode: str | None) -> tuple[float, float]:
        model = TinyLM()
        model.load_state_dict(state)
        if mode is not None:
            model = wrap_quiet(model, None, mode).module
        peft_model = _lora(model)
        with torch.no_grad():
            start = float(lm_loss(peft_model, 0, task=1))
        adapter_opt = torch.optim.AdamW(_adapter_params(peft_model), lr=1e-2)
        losses = train(peft_model, adapter_opt, 40, task=1)
        return start, sum(losses[-5:]) / 5

    start32, end32 = finetune(None)
    start4, end4 = finetune("nf4-dq")
    drop32, drop4 = start32 - end32, start4 - end4
    assert drop32 > 0.3 * start32  # the fine-tune learns something
    assert abs(drop4 - drop32) <= 0.10 * drop32, (drop4, drop32)
    assert abs(end4 - end32) <= 0.10 * end32, (end4, end32)
