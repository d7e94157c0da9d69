from __future__ import annotations

import pytest
import torch
from conftest import CORE_IDS, CORE_MODES, TinyNet, loss_of, make_batch, train

import mixprec
from mixprec.exceptions import CheckpointError


def _fresh(mode, options, seed):
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return mixprec.wrap(model, opt, mode, **options)


@pytest.mark.parametrize(("mode", "options"), CORE_MODES, ids=CORE_IDS)
def test_resume_from_a_checkpoint_is_bit_identical(tmp_path, mode, options):
    model, opt = _fresh(mode, options, seed=0)
    train(model, opt, steps=6, accumulate=2)
    expected = {n: p.detach().clone() for n, p in model.state_dict(keep_vars=False).items()}
    expected_scale = opt.precision.loss_scale

    model, opt = _fresh(mode, options, seed=0)
    train(model, opt, steps=3, accumulate=2)
    torch.save(opt.precision.state_dict(), tmp_path / "ckpt.pt")

    model, opt = _fresh(mode, options, seed=1)  # other initial weights: the load must overwrite
    opt.precision.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    train(model, opt, steps=3, start=3, accumulate=2)
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype is value.dtype
        assert torch.equal(got[name], value), name
    assert opt.precision.loss_scale == expected_scale
    assert opt.precision.steps == 6


def test_separate_model_and_optimizer_state_dicts_resume_too(tmp_path):
    model, opt = _fresh("16-mixed", {}, seed=0)
    train(model, opt, steps=4)
    expected = [p.detach().clone() for p in model.parameters()]
    model, opt = _fresh("16-mixed", {}, seed=0)
    train(model, opt, steps=2)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    model, opt = _fresh("16-mixed", {}, seed=3)
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert ckpt["opt"]["mixprec"]["mode"] == "16-mixed"
    assert ckpt["opt"]["mixprec"]["scaler"]["scale"] == opt.precision.loss_scale
    train(model, opt, steps=2, start=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), expected))


def test_master_weight_checkpoints_hold_fp32_values():
    model, opt = _fresh("bf16-true", {"master_weights": True}, seed=0)
    train(model, opt, steps=3)
    state = model.state_dict()
    masters = [p for g in opt.param_groups for p in g["params"]]
    assert state["fc1.weight"].dtype is torch.float32
    assert any(torch.equal(state["fc1.weight"], m) for m in masters)
    assert not torch.equal(state["fc1.weight"], model.fc1.weight.float())  # more than bf16 holds
    plain = TinyNet()
    plain.load_state_dict(state)  # loads into an unwrapped fp32 model as is
    assert torch.equal(plain.fc1.weight, state["fc1.weight"])


def test_loading_a_checkpoint_of_another_mode_is_a_clear_error():
    model, opt = _fresh("16-mixed", {}, seed=0)
    train(model, opt, steps=1)
    state = opt.precision.state_dict()
    other, other_opt = _fresh("bf16-mixed", {}, seed=1)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(CheckpointError, match=r"saved in mode '16-mixed'.*mode='16-mixed'"):
        other_opt.precision.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    with pytest.raises(CheckpointError, match="not a mixprec checkpoint"):
        other_opt.precision.load_state_dict({"weights": 1})


def test_a_plain_fp32_state_dict_loads_into_a_16_bit_model_and_its_masters():
    torch.manual_seed(0)
    source = TinyNet()
    model, opt = _fresh("16-true", {"master_weights": True}, seed=5)
    model.load_state_dict(source.state_dict())
    masters = [p for g in opt.param_groups for p in g["params"]]
    assert torch.equal(masters[1], source.fc1.weight.detach())
    assert torch.equal(model.fc1.weight, source.fc1.weight.detach().half())
    loss = loss_of(model, *make_batch())
    assert torch.isfinite(loss)
