"""The model stays the user's, and numbers never go non-finite or silently wrong:
master weights follow other code's writes, gradients are visible to torch utilities,
closures and added groups keep the guarantees, fp16 norms/unscaling/weights and the
loss scale behave (the "integrity at the seams" items 1-10)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TinyNet, loss_of, make_batch, train

import mixprec
from mixprec.exceptions import BackwardError, NumericsError, OptimizerMismatchError

MASTER_MODES = [("bf16-true", {"master_weights": True}),
                ("16-true", {"master_weights": True, "init_scale": 256.0})]
MASTER_IDS = ["bf16-true+master", "16-true+master"]


def _wrapped(mode, options, seed=0, lr=1e-2, opt_cls=torch.optim.AdamW):
    torch.manual_seed(seed)
    model = TinyNet()
    return mixprec.wrap(model, opt_cls(model.parameters(), lr=lr), mode, **options)


def _masters(opt):
    return {opt.precision.param_name(m): m for _, m in opt.precision.masters.pairs}


# -- 1. masters follow writes to the model ------------------------------------------------


@pytest.mark.parametrize(("mode", "options"), MASTER_MODES, ids=MASTER_IDS)
@pytest.mark.parametrize("how", ["apply-init", "inner-load", "in-place", "data-swap"])
def test_writes_to_the_models_parameters_are_kept_by_the_next_step(mode, options, how):
    model, opt = _wrapped(mode, options, lr=0.0)  # lr 0: the step changes nothing itself
    train(model, opt, steps=1)
    dtype = model.fc1.weight.dtype
    with torch.no_grad():
        if how == "apply-init":
            model.apply(lambda m: torch.nn.init.constant_(m.weight, 0.25)
                        if isinstance(m, torch.nn.Linear) else None)
        elif how == "inner-load":
            other = TinyNet().to(dtype)
            torch.nn.init.constant_(other.fc1.weight, 0.25)
            model.module.load_state_dict(other.state_dict())
        elif how == "in-place":
            model.fc1.weight.fill_(0.25)
        else:
            model.fc1.weight.data = torch.full_like(model.fc1.weight, 0.25)
    train(model, opt, steps=1, start=1)
    assert torch.all(model.fc1.weight == 0.25)
    assert torch.all(_masters(opt)["fc1.weight"] == 0.25)
    assert torch.all(model.state_dict()["fc1.weight"] == 0.25)


def test_a_write_of_the_same_values_keeps_the_masters_fp32_digits():
    model, opt = _wrapped("bf16-true", {"master_weights": True})
    train(model, opt, steps=2)
    before = _masters(opt)["fc1.weight"].detach().clone()
    assert not torch.equal(before, before.bfloat16().float())  # more than bf16 holds
    with torch.no_grad():
        model.fc1.weight.copy_(model.fc1.weight.clone())  # bumps the version, same values
    opt.precision.masters.refresh_stale()
    assert torch.equal(_masters(opt)["fc1.weight"], before)


# -- 2. gradients on model.parameters() -------------------------------------------------------


@pytest.mark.parametrize(("mode", "options"), MASTER_MODES, ids=MASTER_IDS)
def test_torch_clipping_on_model_parameters_after_unscale_clips_the_step(mode, options):
    """nanoGPT's loop: opt.unscale_(); torch.nn.utils.clip_grad_norm_(model.parameters())."""
    results = {}
    for how in ("torch-on-model", "mixprec"):
        model, opt = _wrapped(mode, options, lr=1e-2)
        tokens, targets = make_batch(0)
        opt.backward(loss_of(model, tokens, targets) * 100)  # large gradients: clipping bites
        if how == "torch-on-model":
            opt.unscale_()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            norm = opt.clip_grad_norm_(1.0)
        opt.step()
        results[how] = (float(norm), _masters(opt)["fc1.weight"].detach().clone())
    torch_norm, torch_weights = results["torch-on-model"]
    our_norm, our_weights = results["mixprec"]
    assert torch_norm > 1.0  # not the silent 0.0 of a model without gradients
    assert torch_norm == pytest.approx(our_norm, rel=1e-2)  # same gradients, in model dtype
    torch.testing.assert_close(torch_weights, our_weights, rtol=0, atol=2e-3)


@pytest.mark.parametrize(("mode", "options"), MASTER_MODES, ids=MASTER_IDS)
def test_unscaled_accumulated_gradients_are_visible_on_the_model(mode, options):
    model, opt = _wrapped(mode, options)
    for seed in (0, 1):  # two micro-batches, accumulated in fp32
        opt.backward(loss_of(model, *make_batch(seed)))
    opt.unscale_()
    master = _masters(opt)["fc1.weight"]
    assert model.fc1.weight.grad is not None
    assert model.fc1.weight.grad.dtype is model.fc1.weight.dtype
    torch.testing.assert_close(model.fc1.weight.grad.float(), master.grad, rtol=1e-2, atol=1e-6)
    opt.step()
    opt.zero_grad()
    assert model.fc1.weight.grad is None and master.grad is None
    # the next backward starts from zero, not from the shown gradients
    opt.backward(loss_of(model, *make_batch(2)))
    opt.unscale_()
    reference = copy.deepcopy(mixprec.unwrap(copy.deepcopy(model)))
    assert model.fc1.weight.grad.abs().sum() > 0 and reference is not None


# -- 3. weight-reading paths agree with state_dict() ---------------------------------------------


def test_save_pretrained_of_a_master_mode_model_writes_the_fp32_masters(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32,
                                     n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = mixprec.wrap(model, opt, "bf16-true", master_weights=True)
    tokens = torch.randint(0, 32, (2, 8))
    for _ in range(2):
        opt.backward(model(tokens, labels=tokens).loss)
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    state = model.state_dict()
    masters = _masters(opt)
    assert saved and saved.keys() <= state.keys()
    for name, value in saved.items():
        assert value.dtype is torch.float32, name
        assert torch.equal(value, state[name]), name
        if name in masters:
            assert torch.equal(value, masters[name]), name


# -- 4. closures ------------------------------------------------------------------------------


def test_a_closure_step_writes_the_masters_back():
    model, opt = _wrapped("bf16-true", {"master_weights": True}, lr=0.1)
    before = model.fc1.weight.detach().clone()
    tokens, targets = make_batch(0)

    def closure():
        opt.zero_grad()
        loss = loss_of(model, tokens, targets)
        opt.backward(loss)
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert not torch.equal(model.fc1.weight, before)
    assert torch.equal(model.fc1.weight, _masters(opt)["fc1.weight"].bfloat16())


@pytest.mark.parametrize(("mode", "options"), [("32-true", {}), ("bf16-true", {}),
                                               ("bf16-true", {"master_weights": True})])
def test_a_closure_with_nan_gradients_is_skipped_like_a_normal_step(mode, options):
    model, opt = _wrapped(mode, options, lr=0.1, opt_cls=torch.optim.SGD)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def closure():
        opt.zero_grad()
        loss = loss_of(model, *make_batch(0)) * float("nan")
        opt.backward(loss)
        return loss

    opt.step(closure)
    assert opt.precision.skipped_steps == 1
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_lbfgs_reevaluations_see_the_current_weights():
    model, opt = _wrapped("bf16-true", {"master_weights": True}, lr=0.5,
                          opt_cls=lambda params, lr: torch.optim.LBFGS(params, lr=lr, max_iter=4))
    tokens, targets = make_batch(0)

    def closure():
        opt.zero_grad()
        loss = loss_of(model, tokens, targets)
        opt.backward(loss)
        return loss

    first = float(opt.step(closure).detach())
    after = float(loss_of(model, tokens, targets).detach())
    assert after < first


def test_closures_in_a_scaling_mode_are_refused_clearly():
    model, opt = _wrapped("16-mixed", {})
    with pytest.raises(BackwardError, match="closures"):
        opt.step(lambda: loss_of(model, *make_batch(0)))


# -- 5. add_param_group ------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "options"), [("32-true", {}), *MASTER_MODES],
                         ids=["32-true", *MASTER_IDS])
def test_add_param_group_refuses_held_and_foreign_parameters(mode, options):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if n != "fc2.bias"])
    model, opt = mixprec.wrap(model, opt, mode, **options)
    groups = len(opt.param_groups)
    with pytest.raises(OptimizerMismatchError, match="already holds"):
        opt.add_param_group({"params": [model.fc1.weight]})
    with pytest.raises(OptimizerMismatchError, match="not the wrapped model's"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == groups
    opt.add_param_group({"params": [model.fc2.bias], "lr": 0.5})
    assert len(opt.param_groups) == groups + 1
    before = model.fc2.bias.detach().clone()
    train(model, opt, steps=1)
    assert not torch.equal(model.fc2.bias, before)  # the added parameter trains


# -- 6-9. fp16 norms, unscaling and weights --------------------------------------------------------


def _one_param_model(value, dtype=torch.float16):
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_16_true_clip_norm_is_computed_in_fp32():
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64)
    model, opt = mixprec.wrap(net, torch.optim.SGD(net.parameters(), lr=0.1), "16-true",
                              init_scale=1.0)
    x = torch.full((4, 64), 3.0)
    opt.backward(model(x).float().pow(2).sum() * 32)  # each grad < 65504, their norm is not
    grads = [p.grad.float() for p in model.parameters()]
    true_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    assert true_norm > 65504 and all(torch.isfinite(g).all() for g in grads)
    norm = opt.clip_grad_norm_(1.0)
    assert math.isfinite(float(norm))
    assert float(norm) == pytest.approx(true_norm, rel=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.precision.skipped_steps == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_16_true_keeps_tiny_true_gradients_alive_through_unscaling():
    """A true gradient of 2e-8 is below fp16's smallest subnormal; scaled by 65536 it is
    representable, and unscaling into the fp32 step copies keeps it."""
    net = _one_param_model(1.0)
    model, opt = mixprec.wrap(net, torch.optim.Adam(net.parameters(), lr=1e-3), "16-true")
    x = torch.ones(1, 1)
    opt.backward(model(x).float().sum() * 2e-8)
    opt.step()
    assert opt.precision.skipped_steps == 0
    assert float(model.weight.detach()) < 1.0  # Adam moved it: the gradient was not flushed to 0


@pytest.mark.parametrize(("mode", "options"), [("16-true", {}), ("16-true", {"master_weights": True})])
def test_an_update_past_fp16s_range_never_leaves_inf_in_the_model(mode, options):
    net = _one_param_model(65000.0)
    model, opt = mixprec.wrap(net, torch.optim.SGD(net.parameters(), lr=1.0), mode,
                              init_scale=1.0, **options)
    opt.backward(model(torch.ones(1, 1)).float().sum() * -4000)  # gradient -4000: w + 4000
    with pytest.raises(NumericsError, match="beyond fp16's range") as info:
        opt.step()
    assert info.value.parameter in ("weight", "of shape (1, 1)")
    assert torch.isfinite(model.weight).all()
    assert float(model.weight.detach()) == float(torch.tensor(65000.0).half())  # as it was
    assert model.weight.dtype is torch.float16


@pytest.mark.parametrize("norm_type", [0, -math.inf])
def test_norm_orders_that_ignore_inf_do_not_let_an_inf_step_through(norm_type):
    model, opt = _wrapped("bf16-true", {}, lr=0.1, opt_cls=torch.optim.SGD)
    opt.backward(loss_of(model, *make_batch(0)))
    model.fc1.weight.grad[0, 0] = float("inf")
    opt.clip_grad_norm_(1.0, norm_type=norm_type)
    opt.step()
    assert opt.precision.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- 10. the loss scale recovers after a streak of bad batches ------------------------------------


def test_the_scale_recovers_within_one_clean_step_after_a_nan_streak():
    torch.manual_seed(0)
    net = TinyNet()
    model, opt = mixprec.wrap(net, torch.optim.AdamW(net.parameters(), lr=1e-3), "16-mixed",
                              collapse_patience=1000)
    train(model, opt, steps=2)
    healthy = opt.precision.loss_scale
    tokens, targets = make_batch(0)
    for _ in range(60):  # NaN batches: every scale fails, the scale backs off to its floor
        opt.backward(loss_of(model, tokens, targets) * float("nan"))
        opt.step()
        opt.zero_grad()
    assert opt.precision.loss_scale < healthy / 2**20
    train(model, opt, steps=1, start=10)
    assert opt.precision.loss_scale == healthy


def test_the_collapse_warning_says_the_scale_collapsed():
    model, opt = _wrapped("16-mixed", {"init_scale": 2.0**16}, lr=1e-3)
    opt.precision.collapse_patience = 5
    tokens, targets = make_batch(0)
    with pytest.warns(mixprec.MixprecWarning, match="loss scale collapsed to .* puts it back") as rec:
        for _ in range(5):
            opt.backward(loss_of(model, tokens, targets) * float("nan"))
            opt.step()
            opt.zero_grad()
    assert rec[0].filename == __file__  # the user's opt.step() line (mixprec.utils.warn_user)
