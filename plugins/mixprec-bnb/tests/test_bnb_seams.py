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


def _small_net() -> torch.nn.Module:
    """Every tensor under 4096 elements: 32-bit Adam state, so bitsandbytes' step can be
    compared closely with torch's."""
    return seeded(lambda: torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(),
                                              torch.nn.Linear(48, 16)))


def _regression_loss(model: Any, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 32, generator=g)
    return (model(x) - x[:, :16].sin()).square().mean()


#: measured agreement of bitsandbytes' 32-bit CPU Adam with torch's over 8 steps:
#: max |difference| 4.5e-8 on weights up to 0.24 (float32 rounding); atol 1e-6 leaves
#: 20x room, and the other decay rule ends further off than 100 * atol
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize(("torch_cls", "kwargs", "mode"), [
    (torch.optim.Adam, {}, "adam8bit"),
    (torch.optim.Adam, {}, "adamw8bit"),
    (torch.optim.AdamW, {}, "adamw8bit"),
    (torch.optim.Adam, {"decoupled_weight_decay": True}, "adam8bit"),
])
def test_weight_decay_follows_the_torch_optimizer_it_replaces(torch_cls, kwargs, mode):
    """torch.optim.Adam adds weight_decay * p to the gradient (L2); AdamW (and Adam with
    decoupled_weight_decay=True) decays the weights. The 8-bit modes give each its own
    rule, checked against torch on the same data."""
    hyper = {"lr": 1e-2, "weight_decay": 0.3, **kwargs}
    reference = _small_net()
    ref_opt = torch_cls(reference.parameters(), **hyper)
    model = _small_net()
    model, opt = mixprec.wrap(model, torch_cls(model.parameters(), **hyper), f"32-true+{mode}")
    for step in range(8):
        _regression_loss(reference, step).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        opt.backward(_regression_loss(model, step))
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        # the step leaves the gradients as backward made them (L2 is added to a copy)
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
        opt.zero_grad()
    other_rule = torch.optim.AdamW if torch_cls is torch.optim.Adam and not kwargs \
        else torch.optim.Adam
    other = _small_net()
    other_opt = other_rule(other.parameters(), lr=1e-2, weight_decay=0.3)
    for step in range(8):
        _regression_loss(other, step).backward()
        other_opt.step()
        other_opt.zero_grad()
    for got, want, wrong in zip(model.parameters(), reference.parameters(), other.parameters()):
        torch.testing.assert_close(got, want, **TOLERANCE)
        assert (want - wrong).abs().max() > 100 * TOLERANCE["atol"]  # the rules differ here


def test_l2_weight_decay_with_8_bit_state_follows_torch_adam():
    """Tensors with 8-bit state: the same L2 rule, within the 8-bit state's own error.
    Measured after 6 steps: 7.6e-4 from torch's Adam with L2, while torch's Adam without
    weight decay is 1.2e-2 from it; the bound is a fifth of the latter."""
    hyper = {"lr": 1e-3, "weight_decay": 0.5}
    runs = {}
    for name, wd in (("l2", 0.5), ("none", 0.0)):
        reference = make_lm()
        ref_opt = torch.optim.Adam(reference.parameters(), **{**hyper, "weight_decay": wd})
        train(reference, ref_opt, 6)
        runs[name] = reference
    model = make_lm()
    model, opt = mixprec.wrap(model, torch.optim.Adam(model.parameters(), **hyper),
                              "32-true+adam8bit")
    train(model, opt, 6)
    w = model.blocks[0].up.weight
    assert opt.state[w]["state1"].dtype is torch.uint8
    error = (w - runs["l2"].blocks[0].up.weight).abs().max()
    without = (runs["none"].blocks[0].up.weight - runs["l2"].blocks[0].up.weight).abs().max()
    assert error < without / 5


class _WithComplex(torch.nn.Module):
    """A complex parameter next to a real layer (spectral filters hold such weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)
        self.filter = torch.nn.Parameter(torch.randn(64, 64, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + (x.to(torch.complex64) @ self.filter).real


@pytest.mark.parametrize("mode", ["32-true+adamw8bit", "32-true+adam8bit", "bf16-mixed+adamw8bit"])
def test_complex_parameters_are_refused_before_anything_changes(mode):
    model = seeded(_WithComplex)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(WrapError, match=r"Parameter 'filter' is torch.complex64, which .* would "
                                        r"update as if it were real numbers"):
        mixprec.wrap(model, opt, mode)
    assert not mixprec.is_wrapped(model)
    assert [dict(g) for g in opt.param_groups] == groups and not opt.state
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("mode", ["nf4", "fp4-dq", "int8", "int8-training"])
def test_the_summary_names_the_layers_every_precision_mode_converted(mode):
    model = seeded(lambda: torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(),
                                               torch.nn.Linear(64, 64), torch.nn.GELU(),
                                               torch.nn.Linear(64, 64)))
    model, opt = wrap_quiet(model, torch.optim.AdamW(model.parameters()), mode)
    summary = opt.precision.summary
    named = [line for line in summary.splitlines() if "0.weight, 2.weight, 4.weight" in line]
    assert named, summary
    if mode == "int8-training":
        assert named == ["weights stay trainable in bfloat16 (0.weight, 2.weight, 4.weight); "
                         "the int8 matmul re-quantizes them every forward"]


@pytest.mark.parametrize("mode", ["nf4-dq", "int8", "int8-training"])
def test_inputs_stay_fp32_and_init_module_builds_the_other_layers_in_fp32(mode):
    """What the README says: these modes leave inputs as they come (each quantized layer
    casts its own), and init_module builds only the Linear layers quantized."""
    with mixprec.init_module(mode) as precision:
        model = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 64))
    assert model[0].weight.dtype is torch.float32 and model[1].bias.dtype is torch.float32
    seen = []
    model[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    wrapped = precision.wrap(model)
    wrapped(torch.randn(2, 64))
    assert seen == [torch.float32]
