"""Checkpoints from outside are validated whole, then applied: all or nothing."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import TinyNet, train

import mixprec
from mixprec.exceptions import CheckpointError, ModeOptionError

MODES = [("32-true", {}), ("16-mixed", {}), ("bf16-true", {"master_weights": True}),
         ("16-true", {})]
IDS = ["32-true", "16-mixed", "bf16-true-masters", "16-true"]


def _fresh(mode, options, seed, steps=0):
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = mixprec.wrap(model, opt, mode, **options)
    if steps:
        train(model, opt, steps=steps)
    return model, opt


def _checkpoint(mode, options):
    _, opt = _fresh(mode, options, seed=0, steps=2)
    buffer = io.BytesIO()
    torch.save(opt.precision.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _snapshot(model, opt):
    """Every tensor a load could change: parameters, buffers, masters, optimizer
    state, and the scaler and counters."""
    tensors = [t.detach().clone() for t in (*model.module.parameters(), *model.module.buffers())]
    masters = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = copy.deepcopy({id(p): s for p, s in opt.state.items()})
    scaler = None if opt.precision.scaler is None else opt.precision.scaler.state_dict()
    return tensors, masters, state, scaler, opt.precision.steps, opt.precision.skipped_steps


def _assert_unchanged(before, model, opt):
    tensors, masters, state, scaler, steps, skipped = before
    now = _snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(tensors, now[0], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(masters, now[1], strict=True))
    assert state.keys() == now[2].keys()
    for key, entry in state.items():
        for name, value in entry.items():
            other = now[2][key][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    assert (scaler, steps, skipped) == now[3:]


def _corrupt_optimizer(ckpt, how):
    optim = ckpt["optimizer"]
    if how == "no-state":
        del optim["state"]
    elif how == "wrong-shape":
        index = next(i for i, s in optim["state"].items() if s["exp_avg"].dim() == 2)
        optim["state"][index]["exp_avg"] = torch.zeros(3, 3)
    elif how == "group-size":
        optim["param_groups"][0]["params"] = optim["param_groups"][0]["params"][:-1]
    return ckpt


@pytest.mark.parametrize(("mode", "options"), MODES, ids=IDS)
@pytest.mark.parametrize("how", ["no-state", "wrong-shape", "group-size"])
def test_a_bad_optimizer_part_leaves_everything_as_it_was(mode, options, how):
    ckpt = _corrupt_optimizer(_checkpoint(mode, options), how)
    model, opt = _fresh(mode, options, seed=1, steps=1)
    before = _snapshot(model, opt)
    with pytest.raises(CheckpointError, match="nothing was changed") as info:
        opt.precision.load_state_dict(ckpt)
    assert "optimizer" in str(info.value)
    _assert_unchanged(before, model, opt)
    with pytest.raises(CheckpointError):  # the optimizer's own load path checks too
        opt.load_state_dict(ckpt["optimizer"])
    _assert_unchanged(before, model, opt)


@pytest.mark.parametrize(("mode", "options"), MODES, ids=IDS)
def test_a_bad_model_part_leaves_everything_as_it_was(mode, options):
    ckpt = _checkpoint(mode, options)
    ckpt["model"]["fc2.weight"] = torch.zeros(1, 1)
    model, opt = _fresh(mode, options, seed=1, steps=1)
    before = _snapshot(model, opt)
    with pytest.raises(CheckpointError, match=r"shape \(1, 1\).*model\.fc2\.weight"):
        opt.precision.load_state_dict(ckpt)
    _assert_unchanged(before, model, opt)
    with pytest.raises(CheckpointError, match=r"missing 'fc2\.bias'"):
        model.load_state_dict({k: v for k, v in _checkpoint(mode, options)["model"].items()
                               if k != "fc2.bias"})
    _assert_unchanged(before, model, opt)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("scale", math.nan, "loss scale must be a positive finite number"),
     ("scale", -4.0, "loss scale must be a positive finite number"),
     ("backoff_factor", 5.0, "backoff_factor must be in"),
     ("growth_tracker", -1, "growth_tracker must be an integer")],
)
def test_scaler_values_are_checked(field, value, message):
    ckpt = _checkpoint("16-mixed", {})
    ckpt["optimizer"]["mixprec"]["scaler"][field] = value
    model, opt = _fresh("16-mixed", {}, seed=1, steps=1)
    before = _snapshot(model, opt)
    with pytest.raises(CheckpointError, match=message):
        opt.precision.load_state_dict(ckpt)
    _assert_unchanged(before, model, opt)


def test_an_unknown_format_version_is_refused():
    ckpt = _checkpoint("bf16-mixed", {})
    ckpt["optimizer"]["mixprec"]["format"] = 99
    _, opt = _fresh("bf16-mixed", {}, seed=1)
    with pytest.raises(CheckpointError, match="format 99 by a newer mixprec"):
        opt.precision.load_state_dict(ckpt)


@pytest.mark.parametrize(
    ("saved", "loading", "differ"),
    [(("bf16-true", {"master_weights": True}), ("bf16-true", {}), "master_weights"),
     (("16-mixed", {"init_scale": 1024}), ("16-mixed", {}), "init_scale")],
)
def test_same_mode_other_options_is_an_error_naming_both(saved, loading, differ):
    ckpt = _checkpoint(*saved)
    model, opt = _fresh(*loading, seed=1, steps=1)
    before = _snapshot(model, opt)
    with pytest.raises(CheckpointError, match=rf"options .*but this wrapper runs it with .*{differ}"):
        opt.precision.load_state_dict(ckpt)
    _assert_unchanged(before, model, opt)


def test_scaler_dynamics_may_change_on_resume_and_the_new_ones_apply():
    ckpt = _checkpoint("16-mixed", {"growth_interval": 7})
    saved_scale = ckpt["optimizer"]["mixprec"]["scaler"]["scale"]
    _, opt = _fresh("16-mixed", {"growth_interval": 3}, seed=1)
    opt.precision.load_state_dict(ckpt)
    assert opt.precision.scaler.growth_interval == 3
    assert opt.precision.precision_mode.options()["growth_interval"] == 3
    assert opt.precision.loss_scale == saved_scale


def test_a_checkpoint_without_a_mode_says_so():
    ckpt = _checkpoint("bf16-mixed", {})
    del ckpt["optimizer"]["mixprec"]["mode"]
    _, opt = _fresh("bf16-mixed", {}, seed=1)
    with pytest.raises(CheckpointError, match="names no mode") as info:
        opt.precision.load_state_dict(ckpt)
    assert "None" not in str(info.value)


# -- options: typed, or refused ----------------------------------------------------------


@pytest.mark.parametrize("value", ["no", "False", 1, None])
def test_boolean_options_take_booleans_only(value):
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ModeOptionError, match="master_weights takes True or False"):
        mixprec.wrap(model, opt, "bf16-true", master_weights=value)
    assert model.fc1.weight.dtype is torch.float32


@pytest.mark.parametrize(("text", "expected"), [("false", False), ("FALSE", False),
                                                ("True", True), ("true", True)])
def test_mode_string_brackets_read_booleans_in_any_case(text, expected):
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters())
    _, opt = mixprec.wrap(model, opt, f"bf16-true[master_weights={text}]")
    assert opt.precision.precision_mode.master_weights is expected
    assert (opt.precision.masters is not None) is expected


def test_bracket_options_and_keywords_give_the_same_mode():
    a = mixprec.PrecisionWrapper("16-mixed[init_scale=1024,growth_interval=10]")
    b = mixprec.PrecisionWrapper("16-mixed", init_scale=1024, growth_interval=10)
    assert a.precision_mode.options() == b.precision_mode.options()
    with pytest.raises(ModeOptionError, match="given both in the mode string and as a keyword"):
        mixprec.PrecisionWrapper("16-mixed[init_scale=1024]", init_scale=8)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"collapse_patience": "x"}, "collapse_patience must be an integer >= 1"),
     ({"collapse_patience": 0}, "collapse_patience must be an integer >= 1"),
     ({"collapse_patience": -3}, "collapse_patience must be an integer >= 1"),
     ({"skip_nonfinite": "yes"}, "skip_nonfinite takes True or False"),
     ({"init_scale": "big"}, "init_scale must be a number"),
     ({"growth_interval": 2.5}, "growth_interval must be an integer"),
     ({"hysteresis": True}, "hysteresis must be an integer")],
)
def test_numeric_options_are_checked_with_their_range(options, message):
    with pytest.raises(ModeOptionError, match=message):
        mixprec.PrecisionWrapper("16-mixed", **options)
