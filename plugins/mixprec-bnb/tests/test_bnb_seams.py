"""Integrity at the seams between the user's objects and bitsandbytes: LR schedulers
built before or after wrap, output dtypes, layers materialized without weights,
GlobalOptimManager overrides made after wrap, Adam's L2 weight decay, complex
parameters, what the summary names."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from conftest import make_lm, train, wrap_quiet

import mixprec
from mixprec.exceptions import WrapError
from mixprec.testing import seeded

EARLY = "lr_scheduler.step()` before `optimizer.step()`"


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize(("mode", "torch_cls"), [("adamw8bit", torch.optim.AdamW),
                                                 ("adam8bit", torch.optim.Adam)])
def test_an_lr_scheduler_built_before_or_after_wrap_steers_the_learning_rate(mode, torch_cls,
                                                                            when):
    model = make_lm()
    opt = torch_cls(model.parameters(), lr=3e-3)
    groups = list(opt.param_groups)
    # lr 3e-3 for the first step, then 0: a step at lr 0 leaves Adam's weights as they are
    schedule = lambda step: 1.0 if step == 0 else 0.0  # noqa: E731
    if when == "before":
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model, opt = mixprec.wrap(model, opt, f"32-true+{mode}")
    if when == "after":
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = [p.detach().clone() for p in model.parameters()]
        train(model, opt, 1)
        scheduler.step()
        moved = [p.detach().clone() for p in model.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(first, moved))
        assert opt.param_groups[0]["lr"] == 0.0 == scheduler.get_last_lr()[0]
        train(model, opt, 1, start=1)
        scheduler.step()
    for a, b in zip(moved, model.parameters()):
        assert torch.equal(a, b), "the step ran with a learning rate other than the scheduler's"
    assert not [str(w.message) for w in caught if EARLY in str(w.message)]
    assert all(a is b for a, b in zip(opt.param_groups, groups))  # the user's dicts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["nf4", "fp4-dq", "int8", "int8-training"])
def test_outputs_come_back_in_fp32_unless_keep_output_dtype(mode, dtype):
    """As every other 16/8-bit mode: outputs in fp32 by default, the forward's own dtype
    with keep_output_dtype=True (the values are the same; only the dtype differs)."""
    outputs = {}
    for keep in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(),
                                    torch.nn.Linear(64, 32)).to(dtype)
        model = wrap_quiet(model, None, mode, keep_output_dtype=keep) if keep else \
            wrap_quiet(model, None, mode)
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
        outputs[keep] = model(x)
    assert outputs[False].dtype is torch.float32
    assert outputs[True].dtype is dtype
    assert torch.equal(outputs[False], outputs[True].float())


def _built_on_meta_then_to_empty(mode: str) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    reference = seeded(lambda: torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(),
                                                   torch.nn.Linear(64, 32)))
    with mixprec.init_module(mode, device="meta") as precision:
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(),
                                    torch.nn.Linear(64, 32))
    model.to_empty(device="cpu")  # materialized, but no weights were loaded
    return model, reference, precision


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_layer_materialized_without_weights_is_a_clear_error(mode):
    model, reference, precision = _built_on_meta_then_to_empty(mode)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    kind = "int8" if mode == "int8" else "4-bit"
    with pytest.raises(RuntimeError, match=rf"This {kind} layer holds no weights yet \(it was "
                                           r"built on the meta device\); load a state dict"):
        model(x)
    with pytest.raises(WrapError, match=r"Layer '0' has no weights yet \(built on meta\); load "
                                        r"a state dict"):
        precision.wrap(model)
    assert not mixprec.is_wrapped(model)
    # loading the weights is the fix: the layers quantize them, and the model runs
    model.load_state_dict(reference.state_dict())
    wrapped = precision.wrap(model)
    expected = wrap_quiet(reference, None, mode)(x)
    assert torch.equal(wrapped(x), expected)


def _state_bits(opt: Any, param: torch.Tensor) -> int:
    state = opt.state[param]["state1"]
    return 8 if state.dtype is torch.uint8 else 32


@pytest.mark.parametrize("mode", ["32-true+adamw8bit", "bf16-true[master_weights=true]+adam8bit",
                                  "16-true+adamw8bit"])
def test_a_global_optim_manager_override_made_after_wrap_is_honoured(mode,
                                                                    global_optim_manager):
    """Lightning's docs register the override after the optimizer exists: the 8-bit modes
    read bitsandbytes' process-wide overrides at each step (for the fp32 masters too)."""
    model = make_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = wrap_quiet(model, opt, mode)
    global_optim_manager.register_module_override(model.blocks[0].up, "weight",
                                                  {"optim_bits": 32})
    train(model, opt, 2)
    held = {opt.precision.param_name(p): p for g in opt.param_groups for p in g["params"]}
    assert _state_bits(opt, held["blocks.0.up.weight"]) == 32  # the override
    assert _state_bits(opt, held["blocks.1.up.weight"]) == 8  # the same shape, no override
    assert _state_bits(opt, held["emb.weight"]) == 32  # optim_32bit_modules (Embedding)


def test_an_override_after_the_first_step_warns_that_the_state_stays_8_bit(global_optim_manager):
    model = make_lm()
    model, opt = mixprec.wrap(model, torch.optim.AdamW(model.parameters()), "32-true+adamw8bit")
    train(model, opt, 1)
    global_optim_manager.register_module_override(model.blocks[0].up, "weight",
                                                  {"optim_bits": 32})
    with pytest.warns(mixprec.MixprecWarning, match=r"blocks\.0\.up\.weight already has 8-bit "
                                                    r"Adam state"):
        train(model, opt, 1, start=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        train(model, opt, 1, start=2)
    assert _state_bits(opt, model.blocks[0].up.weight) == 8
