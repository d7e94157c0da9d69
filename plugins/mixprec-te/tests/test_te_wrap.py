"""wrap() end to end on the CPU with the stand-in (hardware check lifted, see CpuTestMode):
optimizer remap, forward contexts, training, checkpoints, unwrap."""

from __future__ import annotations

import io
import warnings

import _te_standin
import pytest
import torch
from _te_testing import CpuTestMode, Net, batch, loss_of

import mixprec
from mixprec.exceptions import CheckpointError


def wrap(model, mode, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixprec.MixprecWarning)  # the head's shape warning
        return mixprec.wrap(model, opt, mode=mode)


def train(model, opt, steps, start=0, same_batch=False):
    losses = []
    for step in range(start, start + steps):
        loss = loss_of(model, 0 if same_batch else step)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


class Probe(torch.nn.Module):
    """Records the contexts the forward runs in."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict = {}

    def forward(self, x):
        state = _te_standin.FP8GlobalStateManager
        self.seen = {
            "fp8": state.is_fp8_enabled(), "recipe": state.get_fp8_recipe(),
            "autocast": torch.is_autocast_enabled("cpu"),
            "autocast_dtype": torch.get_autocast_dtype("cpu"),
            "default_dtype": torch.zeros(()).dtype, "input_dtype": x.dtype,
        }
        return x


class ProbedNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.probe = Probe()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.probe(x))


def test_optimizer_holds_exactly_the_converted_parameters(te, net):
    model, opt = wrap(net, CpuTestMode("bf16"))
    params = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}
    assert len(params) == len(list(Net().parameters())) == 9
    assert any(p is model.mlp[0].weight for p in params)
    train(model, opt, 1)
    assert opt.state[model.mlp[0].weight]["exp_avg"].dtype is torch.bfloat16


def test_forward_runs_under_te_autocast_inside_torch_autocast(te):
    mode = CpuTestMode("bf16", recipe={"amax_history_len": 4})
    model = wrap(ProbedNet(), mode)[0]
    out = model(torch.randn(8, 16))
    seen = model.probe.seen
    assert seen["fp8"] is True and seen["recipe"] is mode.recipe
    assert seen["recipe"].amax_history_len == 4
    assert seen["autocast"] is True and seen["autocast_dtype"] is torch.bfloat16
    assert seen["default_dtype"] is torch.bfloat16 and seen["input_dtype"] is torch.bfloat16
    assert out.dtype is torch.float32
    # everything is restored after the forward
    assert not _te_standin.FP8GlobalStateManager.is_fp8_enabled()
    assert torch.get_default_dtype() is torch.float32 and not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize(("fallback", "enabled", "dtype"), [
    ("fp32", False, None), ("fp16", True, torch.float16), (None, True, torch.bfloat16),
])
def test_fallback_dtype(te, fallback, enabled, dtype):
    model = wrap(ProbedNet(), CpuTestMode("bf16", fallback_dtype=fallback))[0]
    model(torch.randn(8, 16))
    assert model.probe.seen["autocast"] is enabled
    if enabled:
        assert model.probe.seen["autocast_dtype"] is dtype


def test_keep_output_dtype(te):
    model = wrap(ProbedNet(), CpuTestMode("bf16", keep_output_dtype=True))[0]
    assert model(torch.randn(8, 16)).dtype is torch.bfloat16


def test_older_te_runs_under_fp8_autocast(te_legacy):
    mode = CpuTestMode("bf16")
    model = wrap(ProbedNet(), mode)[0]
    model(torch.randn(8, 16))
    assert model.probe.seen["fp8"] is True and model.probe.seen["recipe"] is mode.recipe


def test_loss_falls(te, net):
    model, opt = wrap(net, CpuTestMode("bf16"))
    losses = train(model, opt, 25, same_batch=True)
    assert losses[-1] < 0.5 * losses[0], losses


def test_float16_mode_scales_the_loss_and_steps_fp32_masters(te, net):
    model, opt = wrap(net, CpuTestMode("fp16", init_scale=1024.0))
    assert opt.precision.loss_scale == 1024.0
    masters = [p for g in opt.param_groups for p in g["params"]]
    assert {p.dtype for p in masters} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    losses = train(model, opt, 25, same_batch=True)
    assert losses[-1] < 0.5 * losses[0], losses
    assert opt.precision.skipped_steps == 0


def test_checkpoint_holds_te_fp8_state_and_resumes_exactly(te, monkeypatch):
    monkeypatch.setenv("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE", "1")  # our own checkpoint
    torch.manual_seed(0)
    mode = {"recipe": {"amax_history_len": 4}}
    model, opt = wrap(Net(), CpuTestMode("bf16", **mode))
    train(model, opt, 3)
    state = opt.precision.state_dict()
    extra = state["model"]["mlp.0._extra_state"]
    assert extra.dtype is torch.uint8 and extra.numel() > 0
    assert state["optimizer"]["mixprec"]["options"]["recipe"] == {"scaling": "delayed",
                                                                   "amax_history_len": 4}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    torch.manual_seed(1)  # different initial weights: everything must come from the checkpoint
    model2, opt2 = wrap(Net(), CpuTestMode("bf16", **mode))
    opt2.precision.load_state_dict(loaded)
    for layer in ("mlp.0", "mlp.2"):
        a = model.get_submodule(layer).fp8_meta
        b = model2.get_submodule(layer).fp8_meta
        assert torch.equal(a["amax_history_fwd"], b["amax_history_fwd"])
        assert torch.equal(a["scale_fwd"], b["scale_fwd"])
    ref = train(model, opt, 3, start=3)
    resumed = train(model2, opt2, 3, start=3)
    assert ref == resumed
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), name


def test_a_plain_models_checkpoint_loads_into_the_te_model(te, net):
    plain = Net()
    model, _ = wrap(net, CpuTestMode("bf16"))
    result = model.load_state_dict(plain.state_dict())  # strict: no _extra_state in it
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model.mlp[0].weight, plain.mlp[0].weight.to(torch.bfloat16))


def test_a_checkpoint_that_does_not_fit_is_refused_before_loading(te, net):
    model, _ = wrap(net, CpuTestMode("bf16"))
    state = Net().state_dict()
    state["extra.weight"] = torch.zeros(1)
    before = model.mlp[0].weight.clone()
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra.weight'\]"):
        model.load_state_dict(state)
    assert torch.equal(model.mlp[0].weight, before)
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["extra.weight"]


def test_unwrap_gives_back_torch_layers(te, net):
    model, opt = wrap(net, CpuTestMode("fp16"))
    train(model, opt, 2)
    masters = {n: m.detach().clone() for n, m in zip(
        (n for n, _ in model.named_parameters()), (p for g in opt.param_groups for p in g["params"]))}
    plain = mixprec.unwrap(model)
    assert not any(type(m).__module__.startswith("transformer_engine") for m in plain.modules())
    assert type(plain.mlp[0]) is torch.nn.Linear and plain.mlp[2].bias is None
    assert type(plain.norm) is torch.nn.LayerNorm and type(plain.rms) is torch.nn.RMSNorm
    for name, p in plain.named_parameters():
        assert p.dtype is torch.float32
        assert torch.equal(p, masters[name]), name
    tokens, _ = batch(0)
    assert plain(tokens).dtype is torch.float32


def _trained_checkpoint(recipe=None):
    torch.manual_seed(0)
    model, opt = wrap(Net(), CpuTestMode("bf16", recipe=recipe))
    train(model, opt, 2)
    buf = io.BytesIO()
    torch.save(opt.precision.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_te_that_refuses_pickled_fp8_state_is_reported_before_loading(te, net):
    state = _trained_checkpoint()
    model, opt = wrap(net, CpuTestMode("bf16"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        opt.precision.load_state_dict(state)
    assert str(info.value).startswith(
        "Transformer Engine 2.20.0+standin refuses to load the FP8 delayed-scaling state (amax "
        "history and scales) of 2 layer(s), first 'mlp.0._extra_state': TE stores it as a pickle, "
        "which could run code, and unpickles it only with NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1.")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the documented way out: drop the FP8 state, the weights load and the scales restart
    weights = {k: v for k, v in state["model"].items() if not k.endswith("._extra_state")}
    model.load_state_dict(weights)
    assert torch.equal(model.mlp[0].weight, state["model"]["mlp.0.weight"])
    assert "amax_history_fwd" not in model.mlp[0].fp8_meta


def test_older_te_loads_fp8_state_without_the_opt_in(te_legacy, net):
    state = _trained_checkpoint()
    model, opt = wrap(net, CpuTestMode("bf16"))
    opt.precision.load_state_dict(state)
    assert model.mlp[0].fp8_meta["amax_history_fwd"].abs().sum() > 0


def test_current_scaling_has_no_pickled_state_to_refuse(te, net):
    state = _trained_checkpoint({"scaling": "current"})
    assert state["model"]["mlp.0._extra_state"].numel() == 0
    model, opt = wrap(net, CpuTestMode("bf16", recipe={"scaling": "current"}))
    opt.precision.load_state_dict(state)
    assert torch.equal(model.mlp[0].weight, state["model"]["mlp.0.weight"])
