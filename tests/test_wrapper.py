from __future__ import annotations

import copy
import dataclasses
import io
import pickle
from collections import namedtuple

import pytest
import torch
from conftest import CORE_IDS, CORE_MODES, TinyNet, loss_of, make_batch, train

import mixprec
from mixprec.exceptions import (
    AlreadyWrappedError,
    BackwardError,
    ModeOptionError,
    OptimizerMismatchError,
    UnknownModeError,
)

LOW = {"16": torch.float16, "bf16": torch.bfloat16, "32": torch.float32, "64": torch.float64}


def _param_dtype(mode: str) -> torch.dtype:
    if mode.endswith("-mixed"):
        return torch.float32
    return LOW[mode.split("-")[0]]


@pytest.mark.parametrize(("mode", "options"), CORE_MODES, ids=CORE_IDS)
def test_every_core_mode_trains_with_the_documented_dtypes(tiny, mode, options):
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-2)
    model, opt = mixprec.wrap(tiny, opt, mode, **options)
    assert opt.precision is model.precision
    assert all(p.dtype is _param_dtype(mode) for p in model.parameters())
    out = model(make_batch()[0])
    assert out.dtype is (torch.float64 if mode == "64-true" else torch.float32)
    losses = train(model, opt, steps=25)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
    # fp16 at torch's initial scale of 2**16 may overflow once or twice while the scale settles
    assert opt.precision.skipped_steps <= (2 if opt.precision.scaler else 0)
    if options.get("master_weights"):
        masters = [p for g in opt.param_groups for p in g["params"]]
        assert all(m.dtype is torch.float32 for m in masters)


@pytest.mark.parametrize(("mode", "tol"), [("bf16-mixed", 5e-2), ("16-mixed", 5e-3),
                                           ("64-true", 1e-5), ("bf16-true", 8e-2)])
def test_outputs_close_to_the_fp32_reference(mode, tol):
    torch.manual_seed(0)
    ref = TinyNet()
    wrapped = mixprec.wrap(copy.deepcopy(ref), mode=mode)
    tokens = make_batch()[0]
    torch.testing.assert_close(wrapped(tokens).float(), ref(tokens), atol=tol, rtol=tol)


def test_16_true_trains_where_a_plain_fp16_adam_loop_goes_nan():
    torch.manual_seed(0)
    plain = TinyNet().half()
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    for step in range(3):
        loss = loss_of(plain, *make_batch(step))
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad()
    assert not all(torch.isfinite(p).all() for p in plain.parameters())  # the known failure

    torch.manual_seed(0)
    model = TinyNet()
    model, opt = mixprec.wrap(model, torch.optim.Adam(model.parameters(), lr=1e-3), "16-true")
    losses = train(model, opt, steps=30)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype is torch.float16 for p in model.parameters())
    assert all(v.dtype is torch.float32 for s in opt.state.values() for k, v in s.items()
               if k != "step")
    assert losses[-1] < losses[0]


def test_bf16_master_weights_track_fp32_more_closely_than_pure_bf16():
    def run(mode, **options):
        torch.manual_seed(0)
        model = TinyNet()
        model, opt = mixprec.wrap(model, torch.optim.AdamW(model.parameters(), lr=3e-4),
                                  mode, **options)
        train(model, opt, steps=30)
        return mixprec.unwrap(model)

    ref = run("32-true")
    err = {}
    for name, opts in [("pure", {}), ("master", {"master_weights": True})]:
        got = run("bf16-true", **opts)
        err[name] = sum(float((a.detach().float() - b.detach()).abs().sum())
                        for a, b in zip(got.parameters(), ref.parameters()))
    assert err["master"] < 0.5 * err["pure"]


def test_inputs_are_cast_in_nested_data_and_non_float_tensors_are_untouched():
    Pair = namedtuple("Pair", "a b")

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor
        ids: torch.Tensor

    seen = {}

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, pair, batch, extra):
            seen.update(a=pair.a.dtype, b=pair.b.dtype, x=batch.x.dtype, ids=batch.ids.dtype,
                        mask=extra["mask"].dtype, lst=extra["list"][0].dtype)
            return {"out": batch.x * self.w, "ids": batch.ids}

    model = mixprec.wrap(Probe(), mode="bf16-true")
    out = model(Pair(torch.ones(3), torch.arange(3)), Batch(torch.ones(3), torch.arange(3)),
                extra={"mask": torch.ones(3, dtype=torch.bool), "list": [torch.ones(2)]})
    assert seen == {"a": torch.bfloat16, "b": torch.int64, "x": torch.bfloat16,
                    "ids": torch.int64, "mask": torch.bool, "lst": torch.bfloat16}
    assert out["out"].dtype is torch.float32 and out["ids"].dtype is torch.int64


def test_keep_output_dtype_returns_low_precision_outputs(tiny):
    model = mixprec.wrap(tiny, mode="bf16-mixed", keep_output_dtype=True)
    assert model(make_batch()[0]).dtype is torch.bfloat16


def test_gradient_accumulation_with_loss_scaling_matches_torch_autocast_and_gradscaler():
    torch.manual_seed(0)
    ref = TinyNet()
    model, fp32 = copy.deepcopy(ref), copy.deepcopy(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    for micro in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_of(ref, *make_batch(micro)).div(3)
        scaler.scale(loss).backward()
        loss_of(fp32, *make_batch(micro)).div(3).backward()
    scaler.unscale_(ref_opt)
    model, opt = mixprec.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), "16-mixed")
    for micro in range(3):
        opt.backward(loss_of(model, *make_batch(micro)).div(3))
    opt.unscale_()
    for (name, p), q, f in zip(model.named_parameters(), ref.parameters(), fp32.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, msg=name)  # same as torch's loop
        torch.testing.assert_close(p.grad, f.grad, atol=5e-2, rtol=0, msg=name)  # fp16 vs fp32


def test_master_weights_accumulate_micro_batches_in_fp32(tiny):
    model, opt = mixprec.wrap(tiny, torch.optim.SGD(tiny.parameters(), lr=0.1), "bf16-true",
                              master_weights=True)
    expected = None
    for micro in range(4):
        opt.backward(loss_of(model, *make_batch(micro)))
        assert all(p.grad is None for p in model.parameters())  # moved to the masters
        masters = [p for g in opt.param_groups for p in g["params"]]
        assert all(m.grad.dtype is torch.float32 for m in masters)
        grads = [m.grad.clone() for m in masters]
        expected = grads if expected is None else expected
    assert not torch.equal(expected[0], grads[0])  # accumulated, not overwritten


def test_clip_grad_norm_sees_the_unscaled_gradients():
    torch.manual_seed(0)
    ref = TinyNet()
    model = copy.deepcopy(ref)
    loss_of(ref, *make_batch()).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)
    model, opt = mixprec.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), "16-mixed")
    opt.backward(loss_of(model, *make_batch()))
    norm = opt.clip_grad_norm_(0.1)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-2, atol=1e-3)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(clipped) == pytest.approx(0.1, rel=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_clip_grad_value_unscales_first(tiny):
    model, opt = mixprec.wrap(tiny, torch.optim.SGD(tiny.parameters(), lr=0.1), "16-true",
                              master_weights=True)
    opt.backward(loss_of(model, *make_batch()))
    opt.clip_grad_value_(1e-3)
    masters = [p for g in opt.param_groups for p in g["params"]]
    assert max(float(m.grad.abs().max()) for m in masters) <= torch.tensor(1e-3).item()
    assert opt.precision.loss_scale == 2.0**16  # clipping did not count as an overflow


@pytest.mark.parametrize("mode", ["16-mixed", "16-true"])
def test_plain_loss_backward_in_a_scaling_mode_is_an_error_not_silent(tiny, mode):
    model, opt = mixprec.wrap(tiny, torch.optim.SGD(tiny.parameters(), lr=0.1), mode,
                              **({"master_weights": True} if mode == "16-true" else {}))
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, *make_batch()).backward()
    with pytest.raises(BackwardError, match=r"opt\.backward\(loss\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_plain_loss_backward_is_fine_where_nothing_is_scaled(tiny):
    model, opt = mixprec.wrap(tiny, torch.optim.SGD(tiny.parameters(), lr=0.1), "bf16-true",
                              master_weights=True)
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, *make_batch()).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(("mode", "options"), CORE_MODES, ids=CORE_IDS)
def test_an_overflowing_step_is_skipped_and_nothing_non_finite_is_stored(tiny, mode, options):
    model, opt = mixprec.wrap(tiny, torch.optim.Adam(tiny.parameters(), lr=1e-2), mode, **options)
    train(model, opt, steps=2)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy({id(p): s for p, s in opt.state.items()})
    scale = opt.precision.loss_scale
    opt.backward(loss_of(model, *make_batch()) * float("inf"))
    opt.step()
    opt.zero_grad()
    assert opt.precision.skipped_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k
    if scale is not None:
        assert opt.precision.loss_scale == scale / 2
    train(model, opt, steps=2, start=5)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_collapsing_run_is_diagnosed_with_the_parameter_name(tiny):
    model, opt = mixprec.wrap(tiny, torch.optim.SGD(tiny.parameters(), lr=0.1), "16-mixed",
                              collapse_patience=5)
    model.fc2.weight.register_hook(lambda g: g * float("nan"))
    with pytest.warns(mixprec.MixprecWarning, match=r"last 5 optimizer steps.*'fc2\.weight'"):
        train(model, opt, steps=5)
    assert opt.precision.skip_streak == 5
    assert opt.precision.last_nonfinite_param == "fc2.weight"
    assert opt.precision.loss_scale == 2.0**16 / 2**5


@pytest.mark.parametrize("kind", ["fused", "foreach"])
@pytest.mark.parametrize("mode", ["16-mixed", "bf16-true+master", "16-true"])
def test_fused_and_foreach_torch_optimizers(tiny, kind, mode):
    name, _, master = mode.partition("+")
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-2, **{kind: True})
    model, opt = mixprec.wrap(tiny, opt, name, **({"master_weights": True} if master else {}))
    losses = train(model, opt, steps=10)
    assert losses[-1] < losses[0]


def test_lr_scheduler_attaches_to_the_wrapped_optimizer(tiny):
    model, opt = mixprec.wrap(tiny, torch.optim.SGD(tiny.parameters(), lr=1.0), "bf16-true",
                              master_weights=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        opt.backward(loss_of(model, *make_batch(step)))
        opt.step()
        opt.zero_grad()
        sched.step()  # warns (an error here) if it thinks opt.step() was not called
    assert opt.param_groups[0]["lr"] == 0.125
    assert isinstance(opt, torch.optim.Optimizer)


def test_the_wrapped_module_behaves_like_the_original(tiny):
    inner = tiny
    names = [n for n, _ in inner.named_parameters()]
    keys = list(inner.state_dict())
    model = mixprec.wrap(inner, mode="bf16-mixed")
    assert model.label == "tiny" and model.fc1 is inner.fc1
    assert [n for n, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == [id(p) for p in inner.parameters()]
    model.eval()
    assert not inner.training and not inner.fc1.training
    model.train()
    assert inner.training and inner.norm.training
    assert model.module is inner and mixprec.is_wrapped(inner)


@pytest.mark.parametrize(("mode", "options"), CORE_MODES, ids=CORE_IDS)
def test_wrapped_modules_survive_deepcopy_pickle_and_torch_save(tiny, mode, options):
    model, opt = mixprec.wrap(tiny, torch.optim.SGD(tiny.parameters(), lr=0.1), mode, **options)
    train(model, opt, steps=1)
    tokens = make_batch()[0]
    expected = model(tokens)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                  torch.load(buffer, weights_only=False)):
        assert isinstance(other, mixprec.WrappedModule)
        torch.testing.assert_close(other(tokens), expected, rtol=0, atol=0)
        assert other.precision is not model.precision
        assert other.precision.mode_name == model.precision.mode_name


def test_wrapping_twice_is_a_clear_error(tiny):
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    model, wopt = mixprec.wrap(tiny, opt, "bf16-mixed")
    with pytest.raises(AlreadyWrappedError, match="already wrapped"):
        mixprec.wrap(model, opt, "16-mixed")
    with pytest.raises(AlreadyWrappedError, match="already wrapped"):
        mixprec.wrap(tiny, opt, "16-mixed")
    with pytest.raises(AlreadyWrappedError, match="optimizer is already wrapped"):
        mixprec.wrap(TinyNet(), wopt, "16-mixed")


class _FailingMode(mixprec.TruePrecision):
    """Casts like bf16-true, swaps a layer, then fails half way."""

    def __init__(self):
        super().__init__("bf16")

    def convert_module(self, module):
        super().convert_module(module)
        module.fc1 = torch.nn.Linear(16, 32)
        raise RuntimeError("conversion failed half way")


def _snapshot(model, opt):
    return ({n: (p, p.detach().clone(), p.dtype, p.requires_grad)
             for n, p in model.named_parameters()},
            {n: (b.detach().clone(), b.dtype) for n, b in model.named_buffers()},
            dict(model.named_modules()),
            [list(g["params"]) for g in opt.param_groups],
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def _assert_unchanged(model, opt, snap):
    params, buffers, modules, groups, state = snap
    for n, p in model.named_parameters():
        obj, value, dtype, rg = params[n]
        assert p is obj and p.dtype is dtype and p.requires_grad is rg and torch.equal(p, value)
    for n, b in model.named_buffers():
        assert b.dtype is buffers[n][1] and torch.equal(b, buffers[n][0])
    assert dict(model.named_modules()) == modules
    assert [list(g["params"]) for g in opt.param_groups] == groups
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k])


def test_wrap_is_atomic_when_a_conversion_fails_half_way(tiny):
    opt = torch.optim.Adam(tiny.parameters(), lr=1e-2)
    loss_of(tiny, *make_batch()).backward()
    opt.step()  # the optimizer has state
    snap = _snapshot(tiny, opt)
    with pytest.raises(RuntimeError, match="half way"):
        mixprec.wrap(tiny, opt, mode=_FailingMode())
    _assert_unchanged(tiny, opt, snap)
    assert not mixprec.is_wrapped(tiny)
    mixprec.wrap(tiny, opt, "bf16-true")  # and it can still be wrapped


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda m, o: mixprec.wrap(m, o, "bf16-mixd"), UnknownModeError),
        (lambda m, o: mixprec.wrap(m, o, "bf16-mixed", master_weights=True), ModeOptionError),
        (lambda m, o: mixprec.wrap(m, o, "32-true", master_weights=True), ModeOptionError),
        (lambda m, o: mixprec.wrap(m, o, "bf16-mixed", init_scale=8.0), ModeOptionError),
        (lambda m, o: mixprec.wrap(m, o, "16-mixed", backoff_factor=2.0), ModeOptionError),
        (lambda m, o: mixprec.wrap(
            m, torch.optim.SGD([*m.parameters(), torch.nn.Parameter(torch.ones(1))], lr=1),
            "bf16-true"), OptimizerMismatchError),
    ],
    ids=["unknown-mode", "bad-option", "master-on-fp32", "scaler-option-on-bf16",
         "bad-scaler-value", "foreign-param"],
)
def test_bad_arguments_raise_before_anything_changes(tiny, call, error):
    opt = torch.optim.Adam(tiny.parameters(), lr=1e-2)
    snap = _snapshot(tiny, opt)
    with pytest.raises(error):
        call(tiny, opt)
    _assert_unchanged(tiny, opt, snap)


def test_existing_optimizer_state_moves_to_the_fp32_masters(tiny):
    opt = torch.optim.Adam(tiny.parameters(), lr=1e-2)
    loss_of(tiny, *make_batch()).backward()
    opt.step()
    opt.zero_grad()
    exp_avg = [opt.state[p]["exp_avg"].clone() for p in tiny.parameters()]
    model, opt = mixprec.wrap(tiny, opt, "bf16-true", master_weights=True)
    masters = [p for g in opt.param_groups for p in g["params"]]
    assert all(opt.state[m]["exp_avg"].dtype is torch.float32 for m in masters)
    assert all(torch.equal(opt.state[m]["exp_avg"], e) for m, e in zip(masters, exp_avg))
    train(model, opt, steps=2)


def test_unwrap_returns_a_plain_module_with_fp32_master_values(tiny):
    model, opt = mixprec.wrap(tiny, torch.optim.SGD(tiny.parameters(), lr=0.1), "bf16-true",
                              master_weights=True)
    train(model, opt, steps=3)
    masters = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    plain = mixprec.unwrap(model)
    assert plain is tiny and not isinstance(plain, mixprec.WrappedModule)
    assert not mixprec.is_wrapped(plain)
    assert all(p.dtype is torch.float32 for p in plain.parameters())
    assert all(torch.equal(p, m) for p, m in zip(plain.parameters(), masters))
    assert mixprec.unwrap(plain) is plain


def test_wrap_without_optimizer_returns_the_module(tiny):
    model = mixprec.wrap(tiny, mode="16-true")
    assert isinstance(model, mixprec.WrappedModule)
    with torch.no_grad():
        assert model(make_batch()[0]).dtype is torch.float32


def test_add_param_group_gets_masters(tiny):
    fc_params = list(tiny.fc1.parameters())
    rest = [p for p in tiny.parameters() if all(p is not q for q in fc_params)]
    model, opt = mixprec.wrap(tiny, torch.optim.SGD(rest, lr=0.1), "bf16-true",
                              master_weights=True)
    opt.add_param_group({"params": fc_params, "lr": 0.01})
    assert all(p.dtype is torch.float32 for p in opt.param_groups[1]["params"])
    before = tiny.fc1.weight.detach().clone()
    train(model, opt, steps=1)
    assert not torch.equal(before, tiny.fc1.weight)


def test_sequential_models_index_and_iterate_through_the_wrapper():
    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model = mixprec.wrap(seq, mode="bf16-mixed")
    assert model[0] is seq[0] and len(model) == 3 and list(model) == list(seq)
    assert bool(mixprec.wrap(torch.nn.Sequential(), mode="32-true"))


def test_a_module_assigned_over_an_inner_child_replaces_it_inside(tiny):
    model = mixprec.wrap(tiny, mode="bf16-mixed")
    new_head = torch.nn.Linear(16, 32, bias=False)
    model.head = new_head  # what peft does when it swaps a top-level layer for a LoRA one
    assert tiny.head is new_head and "head" not in model._modules
    assert "head.weight" in dict(model.named_parameters())
    model.note = "kept on the wrapper"
    assert model.__dict__["note"] == "kept on the wrapper"


def test_a_wrapped_module_nested_in_another_round_trips_its_state_dict(tiny):
    outer = torch.nn.ModuleDict({"base": mixprec.wrap(tiny, mode="bf16-mixed")})
    state = outer.state_dict()
    assert "base.fc1.weight" in state and not any("_module" in k for k in state)
    torch.manual_seed(1)
    other = torch.nn.ModuleDict({"base": mixprec.wrap(TinyNet(), mode="bf16-mixed")})
    result = other.load_state_dict(state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(other["base"].fc1.weight, tiny.fc1.weight)


@pytest.mark.parametrize("mode", ["32-true", "bf16-mixed", "bf16-true"])
def test_a_clipped_step_with_non_finite_gradients_is_skipped_where_nothing_is_scaled(tiny, mode):
    model, opt = mixprec.wrap(tiny, torch.optim.Adam(tiny.parameters(), lr=1e-2), mode)
    train(model, opt, steps=1)
    weights = [p.detach().clone() for p in model.parameters()]
    opt.backward(loss_of(model, *make_batch()) * float("nan"))
    norm = opt.clip_grad_norm_(1.0)
    assert not torch.isfinite(norm)
    opt.step()
    opt.zero_grad()
    assert opt.precision.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    opt.backward(loss_of(model, *make_batch()))
    assert torch.isfinite(opt.clip_grad_norm_(1.0))
    opt.step()
    assert opt.precision.skipped_steps == 1 and opt.precision.skip_streak == 0
