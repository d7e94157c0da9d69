"""Several optimizers for one model: ``wrap(model, [opt_g, opt_d], mode)``.

A small GAN (generator and discriminator, separate losses and optimizers, each
step clearing the other's gradients) against the same loop written by hand in
torch: ``torch.amp.GradScaler`` for ``16-mixed`` (one scaler, ``step`` per
optimizer, ``update`` once per iteration), fp32 masters by hand for ``bf16-true``
with ``master_weights=True``, plain torch for ``32-true``. All bit-identical.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, loss_of, make_batch

import mixprec
from mixprec.exceptions import (
    AlreadyWrappedError,
    BackwardError,
    CheckpointError,
    OptimizerMismatchError,
    WrapError,
)

Z, X, HIDDEN, BATCH = 4, 8, 16, 8


class GAN(torch.nn.Module):
    """``model(z)``: the discriminator's logits for generated samples; ``model(z, real,
    detach=True)``: for generated (cut off from the generator) and real ones."""

    def __init__(self) -> None:
        super().__init__()
        self.G = torch.nn.Sequential(torch.nn.Linear(Z, HIDDEN), torch.nn.ReLU(),
                                     torch.nn.Linear(HIDDEN, X))
        self.D = torch.nn.Sequential(torch.nn.Linear(X, HIDDEN), torch.nn.LeakyReLU(0.2),
                                     torch.nn.Linear(HIDDEN, 1))

    def forward(self, z, real=None, detach=False):
        fake = self.G(z)
        out = self.D(fake.detach() if detach else fake)
        return out if real is None else (out, self.D(real))


def gan(seed: int = 0) -> GAN:
    torch.manual_seed(seed)
    return GAN()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, Z, generator=g), 2.0 + torch.randn(BATCH, X, generator=g)


def d_loss(fake, real):
    return (F.binary_cross_entropy_with_logits(real.float(), torch.ones_like(real.float()))
            + F.binary_cross_entropy_with_logits(fake.float(), torch.zeros_like(fake.float())))


def g_loss(fake):
    return F.binary_cross_entropy_with_logits(fake.float(), torch.ones_like(fake.float()))


def adam(params):
    return torch.optim.Adam(params, lr=1e-2, betas=(0.5, 0.9))


def wrapped(mode: str, seed: int = 0, **options):
    model = gan(seed)
    return mixprec.wrap(model, [adam(model.G.parameters()), adam(model.D.parameters())], mode,
                        **options)


def no_poison(step, who, loss):
    return loss


def d_step(model, opt_d, step, poison=no_poison):
    z, real = batch(step)
    opt_d.zero_grad()
    loss = poison(step, "d", d_loss(*model(z, real, detach=True)))
    opt_d.backward(loss)
    opt_d.step()
    return float(loss.detach())


def g_step(model, opt_g, step, poison=no_poison):
    z, _ = batch(step)
    opt_g.zero_grad()  # also clears what the discriminator's loss left (none: detached)
    loss = poison(step, "g", g_loss(model(z)))
    opt_g.backward(loss)  # reaches the discriminator's parameters too, as in torch
    opt_g.step()
    return float(loss.detach())


def train_gan(model, opt_g, opt_d, steps, start=0, poison=no_poison, scales=None):
    losses = []
    for step in range(start, start + steps):
        losses.append((d_step(model, opt_d, step, poison), g_step(model, opt_g, step, poison)))
        if scales is not None:
            scales.append(model.precision.loss_scale)
    return losses


# -- the hand-written torch loops ------------------------------------------------------------


def torch_16_mixed(steps, poison=no_poison, scales=None, **scaler_options):
    """One GradScaler: scale(loss) per loss, step(opt) per optimizer, update() once."""
    ref = gan()
    opt_g, opt_d = adam(ref.G.parameters()), adam(ref.D.parameters())
    scaler = torch.amp.GradScaler("cpu", **scaler_options)
    losses = []
    for step in range(steps):
        z, real = batch(step)
        opt_d.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            fake, true = ref(z, real, detach=True)
        ld = poison(step, "d", d_loss(fake, true))
        scaler.scale(ld).backward()
        scaler.step(opt_d)
        opt_g.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            fake = ref(z)
        lg = poison(step, "g", g_loss(fake))
        scaler.scale(lg).backward()
        scaler.step(opt_g)
        scaler.update()
        losses.append((float(ld.detach()), float(lg.detach())))
        if scales is not None:
            scales.append(scaler.get_scale())
    return ref, losses


def torch_bf16_masters(steps):
    """bf16 weights, fp32 masters stepped by Adam, gradients moved into the masters
    after each backward, masters rounded into the weights after each step."""
    ref = gan().to(torch.bfloat16)
    pairs = {}
    opts = {}
    for name in ("G", "D"):
        params = list(getattr(ref, name).parameters())
        masters = [p.detach().float().requires_grad_() for p in params]
        pairs[name] = list(zip(params, masters, strict=True))
        opts[name] = adam(masters)

    def backward(loss):
        loss.backward()
        for p, m in pairs["G"] + pairs["D"]:
            if p.grad is not None:
                m.grad = p.grad.float() if m.grad is None else m.grad + p.grad.float()
                p.grad = None

    def step(name):
        opts[name].step()
        with torch.no_grad():
            for p, m in pairs[name]:
                p.copy_(m)

    losses = []
    for i in range(steps):
        z, real = (t.to(torch.bfloat16) for t in batch(i))
        opts["D"].zero_grad()
        ld = d_loss(*ref(z, real, detach=True))
        backward(ld)
        step("D")
        opts["G"].zero_grad()
        lg = g_loss(ref(z))
        backward(lg)
        step("G")
        losses.append((float(ld.detach()), float(lg.detach())))
    return ref, losses


def torch_32(steps):
    ref = gan()
    opt_g, opt_d = adam(ref.G.parameters()), adam(ref.D.parameters())
    losses = []
    for i in range(steps):
        z, real = batch(i)
        opt_d.zero_grad()
        ld = d_loss(*ref(z, real, detach=True))
        ld.backward()
        opt_d.step()
        opt_g.zero_grad()
        lg = g_loss(ref(z))
        lg.backward()
        opt_g.step()
        losses.append((float(ld.detach()), float(lg.detach())))
    return ref, losses


def assert_same_weights(model, ref):
    got = dict(model.named_parameters())
    moved = 0.0
    start = dict(gan().named_parameters())
    for name, want in ref.named_parameters():
        assert got[name].dtype is want.dtype, name
        assert torch.equal(got[name], want), name
        moved = max(moved, float((want.detach().float() - start[name].detach()).abs().max()))
    assert moved > 1e-2, "training hardly moved the weights"


# -- against torch ---------------------------------------------------------------------------


def test_a_gan_in_16_mixed_is_bit_identical_to_one_gradscaler_with_two_optimizers():
    """Through overflows (the scale backs off) and growth: the same scale each iteration."""
    options = {"init_scale": 2.0**20, "growth_interval": 2}
    mine, theirs = [], []
    ref, ref_losses = torch_16_mixed(12, scales=theirs, **options)
    model, (opt_g, opt_d) = wrapped("16-mixed", recover_after=0, **options)
    assert train_gan(model, opt_g, opt_d, 12, scales=mine) == ref_losses
    assert mine == theirs  # one update per iteration, as scaler.update()
    assert any(b < a for a, b in itertools.pairwise(mine))  # backed off
    assert any(b > a for a, b in itertools.pairwise(mine))  # and grew
    assert_same_weights(model, ref)
    assert model.precision.steps == 12
    assert opt_g.precision.steps == opt_d.precision.steps == 12
    assert model.precision.skipped_steps == opt_d.precision.skipped_steps > 0


def test_a_gan_in_bf16_true_with_masters_is_bit_identical_to_hand_written_masters():
    ref, ref_losses = torch_bf16_masters(10)
    model, (opt_g, opt_d) = wrapped("bf16-true", master_weights=True)
    assert train_gan(model, opt_g, opt_d, 10) == ref_losses
    assert_same_weights(model, ref)
    for opt, part in ((opt_g, model.G), (opt_d, model.D)):  # each optimizer its own masters
        masters = [m for g in opt.param_groups for m in g["params"]]
        assert all(m.dtype is torch.float32 for m in masters)
        assert all(torch.equal(m.to(torch.bfloat16), p) for m, p in zip(masters, part.parameters()))
    # the model's state dict holds every optimizer's fp32 masters
    assert all(v.dtype is torch.float32 for v in model.state_dict().values())


def test_a_gan_in_32_true_is_bit_identical_to_plain_torch():
    ref, ref_losses = torch_32(10)
    model, (opt_g, opt_d) = wrapped("32-true")
    assert train_gan(model, opt_g, opt_d, 10) == ref_losses
    assert_same_weights(model, ref)


@pytest.mark.parametrize("who", ["d", "g"])
def test_an_overflow_in_one_optimizer_skips_only_its_step_and_backs_off_once(who):
    def poison(step, name, loss):
        return loss * float("inf") if (step, name) == (2, who) else loss

    mine, theirs = [], []
    ref, _ = torch_16_mixed(5, poison, scales=theirs, init_scale=1024.0)
    model, (opt_g, opt_d) = wrapped("16-mixed", init_scale=1024.0)
    train_gan(model, opt_g, opt_d, 2, scales=mine)
    assert mine == [1024.0, 1024.0]  # no overflow of its own before
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    d_step(model, opt_d, 2, poison)
    g_step(model, opt_g, 2, poison)
    skipped, stepped = ("D", "G") if who == "d" else ("G", "D")
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed is name.startswith(stepped), name  # only the poisoned one skipped
    assert model.precision.loss_scale == 512.0  # backed off once for the round
    assert (opt_d.precision.skipped_steps, opt_g.precision.skipped_steps) == (
        (1, 0) if who == "d" else (0, 1))
    assert model.precision.skipped_steps == 1
    assert model.precision.last_nonfinite_param.startswith(skipped)
    mine.append(model.precision.loss_scale)
    train_gan(model, opt_g, opt_d, 2, start=3, scales=mine)
    assert_same_weights(model, ref)
    assert mine == theirs and mine[-1] == 512.0


def test_a_critic_stepping_twice_per_generator_step_updates_the_scale_per_round():
    """A backward through an optimizer that already stepped closes the round: the
    torch loop calls update() after the extra critic step and after the generator's."""
    options = {"init_scale": 2.0**24, "growth_interval": 2}
    ref = gan()
    ref_g, ref_d = adam(ref.G.parameters()), adam(ref.D.parameters())
    scaler = torch.amp.GradScaler("cpu", **options)
    model, (opt_g, opt_d) = wrapped("16-mixed", recover_after=0, **options)
    for step in range(6):
        for critic in range(2):
            z, real = batch(10 * step + critic)
            ref_d.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                out = ref(z, real, detach=True)
            scaler.scale(d_loss(*out)).backward()
            scaler.step(ref_d)
            if critic == 0:
                scaler.update()
            d_step(model, opt_d, 10 * step + critic)
        z, _ = batch(10 * step)
        ref_g.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = ref(z)
        scaler.scale(g_loss(out)).backward()
        scaler.step(ref_g)
        scaler.update()
        g_step(model, opt_g, 10 * step)
        assert model.precision.loss_scale == scaler.get_scale(), step
    assert_same_weights(model, ref)
    assert model.precision.steps == 12  # rounds: the extra critic step, then both
    assert opt_d.precision.steps == 12 and opt_g.precision.steps == 6


# -- checkpoints -----------------------------------------------------------------------------


MODES = [("16-mixed", {"init_scale": 2.0**20, "growth_interval": 2}),
         ("bf16-true", {"master_weights": True}), ("32-true", {})]
MODE_IDS = ["16-mixed", "bf16-true+master", "32-true"]


@pytest.mark.parametrize(("mode", "options"), MODES, ids=MODE_IDS)
@pytest.mark.parametrize("where", ["after-a-round", "inside-a-round"])
def test_resuming_both_optimizers_is_bit_identical(tmp_path, mode, options, where):
    model, (opt_g, opt_d) = wrapped(mode, **options)
    train_gan(model, opt_g, opt_d, 6)
    expected = {n: v.clone() for n, v in model.state_dict().items()}
    expected_scale = model.precision.loss_scale

    model, (opt_g, opt_d) = wrapped(mode, **options)
    train_gan(model, opt_g, opt_d, 3)
    if where == "inside-a-round":
        d_step(model, opt_d, 3)  # the generator has not stepped: the round is open
    torch.save(opt_d.precision.state_dict(), tmp_path / "ckpt.pt")

    model, (opt_g, opt_d) = wrapped(mode, seed=1, **options)  # the load must overwrite
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert len(ckpt["optimizers"]) == 2 and ckpt["mixprec"]["format"] == 2
    assert ckpt["mixprec"]["round"]["stepped"] == ([False, True] if where == "inside-a-round"
                                                   else [False, False])
    model.precision.load_state_dict(ckpt)
    if where == "inside-a-round":
        g_step(model, opt_g, 3)
        train_gan(model, opt_g, opt_d, 2, start=4)
    else:
        train_gan(model, opt_g, opt_d, 3, start=3)
    got = model.state_dict()
    for name, value in expected.items():
        assert got[name].dtype is value.dtype and torch.equal(got[name], value), name
    assert model.precision.loss_scale == expected_scale
    assert model.precision.steps == 6 and opt_g.precision.steps == opt_d.precision.steps == 6


def _everything(model, opts):
    return ({n: v.clone() for n, v in model.state_dict().items()},
            [copy.deepcopy(o.state_dict()) for o in opts], model.precision.loss_scale,
            model.precision.steps)


def _assert_same(a, b):
    (weights_a, opts_a, scale_a, steps_a), (weights_b, opts_b, scale_b, steps_b) = a, b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert (scale_a, steps_a) == (scale_b, steps_b)
    assert repr(opts_a) == repr(opts_b)


def test_checkpoints_of_another_optimizer_count_are_refused_with_nothing_changed():
    model, (opt_g, opt_d) = wrapped("16-mixed", init_scale=1024.0)
    train_gan(model, opt_g, opt_d, 2)
    several = model.precision.state_dict()
    other = gan(1)
    single_model, single_opt = mixprec.wrap(other, adam(other.parameters()), "16-mixed",
                                            init_scale=1024.0)
    single = single_model.precision.state_dict()

    fresh, (fresh_g, fresh_d) = wrapped("16-mixed", seed=2, init_scale=1024.0)
    before = _everything(fresh, (fresh_g, fresh_d))
    with pytest.raises(CheckpointError, match="one optimizer but this model was wrapped with 2"):
        fresh.precision.load_state_dict(single)
    damaged = copy.deepcopy(several)
    damaged["optimizers"][1]["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"optimizer\.state\[0\]"):
        fresh.precision.load_state_dict(damaged)  # the first optimizer's state is not loaded
    damaged = copy.deepcopy(several)
    damaged["mixprec"]["round"] = {"stepped": [True], "found_inf": False}
    with pytest.raises(CheckpointError, match="round"):
        fresh.precision.load_state_dict(damaged)
    damaged = copy.deepcopy(several)
    damaged["optimizers"].append(damaged["optimizers"][0])
    with pytest.raises(CheckpointError, match="3 optimizers but this model was wrapped with 2"):
        fresh.precision.load_state_dict(damaged)
    _assert_same(before, _everything(fresh, (fresh_g, fresh_d)))

    before = _everything(single_model, (single_opt,))
    with pytest.raises(CheckpointError, match="2 optimizers but this model was wrapped with one"):
        single_model.precision.load_state_dict(several)
    _assert_same(before, _everything(single_model, (single_opt,)))


def test_each_optimizers_state_dict_is_its_own_and_loads_alone():
    model, (opt_g, opt_d) = wrapped("16-mixed")
    train_gan(model, opt_g, opt_d, 3)
    saved = opt_d.state_dict()
    assert saved["mixprec"]["format"] == 1  # readable as any one optimizer's state dict
    assert len(saved["param_groups"][0]["params"]) == len(list(model.D.parameters()))
    _, (_, again_d) = wrapped("16-mixed", seed=1)
    again_d.load_state_dict(saved)
    assert again_d.precision.steps == 3
    assert repr(again_d.state_dict()) == repr(saved)


# -- wrap: atomic refusals -------------------------------------------------------------------


def _snapshot(model, opts):
    return ({n: (p, p.detach().clone(), p.dtype) for n, p in model.named_parameters()},
            [[list(g["params"]) for g in o.param_groups] for o in opts],
            [{id(p): {k: v.clone() for k, v in s.items()} for p, s in o.state.items()}
             for o in opts])


def _assert_unchanged(model, opts, snap):
    params, groups, states = snap
    for n, p in model.named_parameters():
        obj, value, dtype = params[n]
        assert p is obj and p.dtype is dtype and torch.equal(p, value), n
    assert [[list(g["params"]) for g in o.param_groups] for o in opts] == groups
    for o, state in zip(opts, states, strict=True):
        assert {id(p) for p in o.state} == set(state)
        for p, s in o.state.items():
            assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())
    assert not mixprec.is_wrapped(model)


class _FailingMode(mixprec.TruePrecision):
    """Casts like bf16-true with masters, then fails half way."""

    def __init__(self):
        super().__init__("bf16", master_weights=True)

    def convert_module(self, module):
        super().convert_module(module)
        raise RuntimeError("conversion failed half way")


def _refusals():
    def overlapping(m):
        return [adam(m.parameters()), adam(m.D.parameters())]

    def foreign(m):
        return [adam(m.G.parameters()), adam([*m.D.parameters(), torch.nn.Parameter(torch.ones(2))])]

    def same_twice(m):
        o = adam(m.parameters())
        return [o, o]

    return [
        (overlapping, "16-mixed", OptimizerMismatchError, r"'D\.0\.weight' is in optimizers 0 and 1"),
        (foreign, "bf16-true", OptimizerMismatchError, "not the model's"),
        (same_twice, "16-mixed", OptimizerMismatchError, "passed twice"),
        (lambda m: [adam(m.G.parameters()), adam(m.D.parameters())], _FailingMode(),
         RuntimeError, "half way"),
    ]


@pytest.mark.parametrize(("optimizers", "mode", "error", "match"), _refusals(),
                         ids=["overlapping", "foreign", "same-twice", "fails-half-way"])
def test_wrap_refuses_or_rolls_back_with_nothing_changed(optimizers, mode, error, match):
    model = gan()
    opts = optimizers(model)
    for o in opts:  # optimizer state, which a conversion would move or cast
        loss_of_gan = g_loss(model(batch(0)[0])) + d_loss(*model(*batch(0), detach=True))
        loss_of_gan.backward()
        o.step()
        o.zero_grad()
    snap = _snapshot(model, opts)
    with pytest.raises(error, match=match):
        mixprec.wrap(model, opts, mode)
    _assert_unchanged(model, opts, snap)
    mixprec.wrap(model, [adam(model.G.parameters()), adam(model.D.parameters())], "bf16-true")


def test_other_wrong_lists_are_refused_clearly():
    model = gan()
    with pytest.raises(WrapError, match="empty list"):
        mixprec.wrap(model, [], "16-mixed")
    with pytest.raises(WrapError, match="None"):
        mixprec.wrap(model, [adam(model.G.parameters()), None], "16-mixed")
    with pytest.raises(WrapError, match="monitor"):
        mixprec.PrecisionWrapper("16-mixed", monitor=object()).wrap(
            model, [adam(model.G.parameters()), adam(model.D.parameters())])
    other = gan()
    _, (done, _) = mixprec.wrap(other, [adam(other.G.parameters()), adam(other.D.parameters())])
    with pytest.raises(AlreadyWrappedError, match="optimizer is already wrapped"):
        mixprec.wrap(model, [adam(model.G.parameters()), done], "16-mixed")
    assert not mixprec.is_wrapped(model)


def test_a_list_of_one_optimizer_is_the_one_optimizer_wrap(tiny):
    model, opts = mixprec.wrap(tiny, [torch.optim.SGD(tiny.parameters(), lr=0.1)], "16-mixed")
    assert isinstance(opts, tuple) and len(opts) == 1
    (opt,) = opts
    assert opt.precision is model.precision and model.precision.optimizers == (opt,)
    opt.backward(loss_of(model, *make_batch()))
    opt.step()
    assert "optimizers" not in model.precision.state_dict()


# -- the training loop with several optimizers -----------------------------------------------


def test_wrapped_objects_and_counters():
    model, (opt_g, opt_d) = wrapped("16-mixed")
    assert model.precision.optimizers == (opt_g, opt_d)
    assert opt_g.precision is not opt_d.precision is not model.precision
    assert opt_g.precision.loss_scale == model.precision.loss_scale
    assert "shared by the 2 optimizers" in model.precision.summary
    assert opt_g.precision.summary == model.precision.summary
    assert [len(g["params"]) for g in opt_d.param_groups] == [4]


def test_plain_loss_backward_is_still_caught_where_the_loss_is_scaled():
    model, (_, opt_d) = wrapped("16-mixed")
    z, real = batch(0)
    d_loss(*model(z, real, detach=True)).backward()
    with pytest.raises(BackwardError, match=r"opt\.backward\(loss\)"):
        opt_d.step()


def test_clipping_one_optimizer_touches_only_its_gradients():
    model, (opt_g, opt_d) = wrapped("16-mixed")
    opt_g.backward(g_loss(model(batch(0)[0])))  # gradients for both
    g_before = [p.grad.clone() for p in model.G.parameters()]
    opt_d.clip_grad_norm_(1e-3)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.D.parameters()]))
    assert float(total) == pytest.approx(1e-3, rel=1e-3)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.G.parameters(), g_before))  # scaled
    opt_g.step()  # unscaled now, by the same scale
    assert model.precision.loss_scale == 2.0**16


@pytest.mark.parametrize(("mode", "options"), [("16-mixed", {}),
                                               ("bf16-true", {"master_weights": True})])
def test_add_param_group_refuses_parameters_of_the_other_optimizer(mode, options):
    torch.manual_seed(0)
    model = TinyNet()
    rest = [p for n, p in model.named_parameters() if not n.startswith("fc2")]
    model, (opt_a, opt_b) = mixprec.wrap(
        model, [torch.optim.SGD(rest, lr=0.1), torch.optim.SGD(model.fc2.parameters(), lr=0.1)],
        mode, **options)
    with pytest.raises(OptimizerMismatchError, match="optimizer 1 holds"):
        opt_a.add_param_group({"params": [model.fc2.weight]})
    loss = loss_of(model, *make_batch())
    opt_a.backward(loss)
    opt_a.step()
    opt_b.step()
    assert model.precision.steps == 1


def test_unwrap_gives_every_optimizers_fp32_masters_to_the_model():
    model, (opt_g, opt_d) = wrapped("bf16-true", master_weights=True)
    train_gan(model, opt_g, opt_d, 2)
    masters = {n: v.clone() for n, v in model.state_dict().items()}
    plain = mixprec.unwrap(model)
    for name, p in plain.named_parameters():
        assert p.dtype is torch.float32 and torch.equal(p, masters[name]), name


def test_distributed_full_checkpoints_take_any_of_the_optimizers():
    import mixprec.distributed as mpd

    model, (opt_g, opt_d) = wrapped("16-mixed")
    train_gan(model, opt_g, opt_d, 1)
    state = mpd.get_state_dict(model, opt_d, full_state_dict=True)
    assert len(state["optimizers"]) == 2
    again, (g, _) = wrapped("16-mixed", seed=1)
    mpd.set_state_dict(again, g, state, full_state_dict=True)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))
    other = gan()
    _, stranger = mixprec.wrap(other, adam(other.parameters()))
    with pytest.raises(CheckpointError, match="not the one wrapped"):
        mpd.get_state_dict(model, stranger, full_state_dict=True)


def test_the_doctor_refuses_an_optimizer_factory_returning_several():
    """The doctor trains with one optimizer; a factory giving a list says so in the row."""
    torch.manual_seed(0)
    model = TinyNet()

    def two(params):
        return [torch.optim.SGD(params[:2], lr=0.1), torch.optim.SGD(params[2:], lr=0.1)]

    def loss(m, b):
        return loss_of(m, *b)

    report = mixprec.doctor(model, [make_batch(seed=i) for i in range(2)], loss_fn=loss,
                            optimizer=two, modes=["bf16-true"], steps=1)
    row = report.mode("bf16-true")
    assert row.status == "error" and "one torch.optim.Optimizer" in row.error


def test_optimizer_state_dicts_loaded_before_wrap_resume_scale_and_counters():
    """Each opt.state_dict() loaded into a plain optimizer before wrap, as with one."""
    options = {"init_scale": 2.0**20, "growth_interval": 2}
    model, (opt_g, opt_d) = wrapped("16-mixed", **options)
    train_gan(model, opt_g, opt_d, 6)
    expected = {n: v.clone() for n, v in model.state_dict().items()}
    expected_scale = model.precision.loss_scale

    model, (opt_g, opt_d) = wrapped("16-mixed", **options)
    train_gan(model, opt_g, opt_d, 3)
    saved = [o.state_dict() for o in (opt_g, opt_d)], model.state_dict()
    assert model.precision.loss_scale != 2.0**20  # something to resume

    plain = gan(1)
    plain.load_state_dict(saved[1])
    plain_g, plain_d = adam(plain.G.parameters()), adam(plain.D.parameters())
    plain_g.load_state_dict(saved[0][0])
    plain_d.load_state_dict(saved[0][1])
    model, (opt_g, opt_d) = mixprec.wrap(plain, [plain_g, plain_d], "16-mixed", **options)
    assert (opt_g.precision.steps, opt_d.precision.steps) == (3, 3)
    train_gan(model, opt_g, opt_d, 3, start=3)
    assert all(torch.equal(v, expected[n]) for n, v in model.state_dict().items())
    assert model.precision.loss_scale == expected_scale
    assert all("mixprec" not in g for o in (opt_g, opt_d) for g in o.optimizer.param_groups)

    other = gan(1)
    other_d = adam(other.D.parameters())
    other_d.load_state_dict(saved[0][1])
    snap = _snapshot(other, [other_d])
    with pytest.raises(CheckpointError, match="before wrap"):
        mixprec.wrap(other, [adam(other.G.parameters()), other_d], "bf16-mixed")
    _assert_unchanged(other, [other_d], snap)
