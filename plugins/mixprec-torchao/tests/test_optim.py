"""Low-bit AdamW: what is carried over, what is refused, exact state bytes, checkpoints."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import make_mlp, make_wide, train_wide
from mixprec_torchao import LowBitAdamW, state_bytes

import mixprec
from mixprec.exceptions import WrapError
from mixprec.testing import checkpoint_roundtrip as roundtrip
from mixprec.testing import wrap_quietly as wrap_quiet

OPTIM_MODES = ["ao-adamw8bit", "ao-adamw4bit", "ao-adamw-fp8"]
#: state bytes per parameter the issue allows
TARGET = {"ao-adamw8bit": 2.1, "ao-adamw4bit": 1.1, "ao-adamw-fp8": 2.1}
STATE_CLASS = {"ao-adamw8bit": "OptimState8bit", "ao-adamw4bit": "OptimState4bit",
               "ao-adamw-fp8": "OptimStateFp8"}


def _expected_bytes(mode: str, numel: int) -> int:
    """Exact bytes of one tensor's AdamW state in torchao 0.18's layout."""
    step = 4  # fp32 step counter
    if numel < 4096:  # fp32 exp_avg and exp_avg_sq
        return 2 * 4 * numel + step
    if mode == "ao-adamw8bit":  # uint8 codes, fp32 scale per 256, 256-entry fp32 lookup table
        return 2 * (numel + numel // 256 * 4 + 256 * 4) + step
    if mode == "ao-adamw4bit":  # two codes per byte, fp32 scale per 128, 16-entry table
        return 2 * (numel // 2 + numel // 128 * 4 + 16 * 4) + step
    return 2 * (numel + numel // 256 * 4) + step  # fp8 e4m3 codes, fp32 scale per 256


@pytest.mark.parametrize("mode", OPTIM_MODES)
def test_state_bytes_per_parameter(mode: str, record_property) -> None:
    model = make_wide()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = mixprec.wrap(model, opt, mode=f"32-true+{mode}")
    train_wide(model, opt, 1)
    n_params = sum(p.numel() for p in model.parameters())
    total = state_bytes(opt)
    assert total == sum(_expected_bytes(mode, p.numel()) for p in model.parameters())
    weights = [p for p in model.parameters() if p.dim() == 2]
    weight_bytes = state_bytes(opt, weights)
    n_weights = sum(p.numel() for p in weights)
    record_property("bytes_per_param_all", round(total / n_params, 4))
    record_property("bytes_per_param_weights", round(weight_bytes / n_weights, 4))
    print(f"{mode}: {total} bytes for {n_params} parameters = {total / n_params:.4f} B/param "
          f"(weights only: {weight_bytes / n_weights:.4f}); torch.optim.AdamW: 8.0")
    assert total / n_params <= TARGET[mode]
    assert {type(opt.state[p]["exp_avg"]).__name__ for p in weights} == {STATE_CLASS[mode]}


def test_hyperparameters_and_groups_are_carried() -> None:
    model = make_mlp()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.AdamW(
        [{"params": decay, "name": "decay"},
         {"params": no_decay, "weight_decay": 0.0, "lr": 5e-3, "betas": (0.8, 0.99), "eps": 1e-6,
          "name": "no_decay"}],
        lr=1e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.05, amsgrad=True, foreach=True,
    )
    model, opt = mixprec.wrap(model, opt, mode="32-true+ao-adamw8bit")
    inner = opt.optimizer
    assert type(inner).__name__ == "AdamW8bit" and isinstance(inner, __import__(
        "torchao.optim", fromlist=["AdamW8bit"]).AdamW8bit)
    first, second = opt.param_groups
    assert first["params"] == decay and second["params"] == no_decay
    assert (first["name"], second["name"]) == ("decay", "no_decay")
    assert float(first["lr"]) == pytest.approx(1e-3) and float(second["lr"]) == pytest.approx(5e-3)
    assert first["betas"] == (0.85, 0.995) and second["betas"] == (0.8, 0.99)
    assert (first["eps"], second["eps"]) == (1e-7, 1e-6)
    assert (first["weight_decay"], second["weight_decay"]) == (0.05, 0.0)
    assert first["amsgrad"] is True
    assert inner.defaults["betas"] == (0.85, 0.995) and inner.defaults["weight_decay"] == 0.05
    assert "not carried (torchao compiles its own fused step): foreach" in opt.precision.summary
    assert "fp32 state for 9 tensors under 4096 elements" in opt.precision.summary


def test_small_tensors_step_exactly_like_torch_adamw() -> None:
    """Below 4096 elements torchao keeps fp32 state: the same update as torch.optim.AdamW
    with the carried per-group hyper-parameters (up to compiled-kernel rounding)."""
    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(),
                                    torch.nn.Linear(32, 32))
        first, second = list(model[0].parameters()), list(model[2].parameters())
        opt = torch.optim.AdamW(
            [{"params": first},
             {"params": second, "lr": 2e-2, "betas": (0.7, 0.9), "weight_decay": 0.1}],
            lr=1e-2, eps=1e-6, weight_decay=0.02)
        return model, opt

    ref_model, ref_opt = mixprec.wrap(*build(), mode="32-true")
    model, opt = mixprec.wrap(*build(), mode="32-true+ao-adamw4bit")
    assert all(p.numel() < 4096 for p in model.parameters())
    for step in range(5):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(step))
        for m, o in ((ref_model, ref_opt), (model, opt)):
            o.backward((m(x) - x).square().mean())
            o.step()
            o.zero_grad()
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", OPTIM_MODES)
def test_quantized_state_follows_torch_adamw(mode: str) -> None:
    ref_model, model = make_wide(), make_wide()
    ref_model, ref_opt = mixprec.wrap(ref_model, torch.optim.AdamW(ref_model.parameters()))
    model, opt = mixprec.wrap(model, torch.optim.AdamW(model.parameters()),
                              mode=f"32-true+{mode}")
    train_wide(ref_model, ref_opt, 3)
    train_wide(model, opt, 3)
    w0 = make_wide().state_dict()
    for name, p in model.named_parameters():
        ref_update = ref_model.state_dict()[name] - w0[name]
        update = p.detach() - w0[name]
        cos = torch.nn.functional.cosine_similarity(update.flatten(), ref_update.flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))


def test_plain_adam_without_weight_decay_is_accepted_and_with_it_refused() -> None:
    model = make_mlp()
    _, opt = mixprec.wrap(model, torch.optim.Adam(model.parameters()), mode="ao-adamw-fp8")
    assert opt.param_groups[0]["weight_decay"] == 0.0
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), weight_decay=0.01)
    with pytest.raises(WrapError, match=r"param group 0 applies Adam's L2 weight decay "
                                        r"\(weight_decay=0.01\), but ao-adamw-fp8 decouples"):
        mixprec.wrap(model, opt, mode="ao-adamw-fp8")
    model = make_mlp()
    decoupled = torch.optim.Adam(model.parameters(), weight_decay=0.01, decoupled_weight_decay=True)
    _, opt = mixprec.wrap(model, decoupled, mode="ao-adamw-fp8")
    assert opt.param_groups[0]["weight_decay"] == 0.01


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1), r"but the optimizer is torch.optim.sgd.SGD"),
        (lambda ps: torch.optim.AdamW(ps, maximize=True), r"param group 0 has maximize=True"),
        (lambda ps: torch.optim.AdamW(ps, differentiable=True), r"differentiable=True"),
    ],
)
def test_what_cannot_be_carried_is_refused_before_anything_changes(make, message) -> None:
    model = make_mlp()
    opt = make(list(model.parameters()))
    groups_before = [dict(g) for g in opt.param_groups]
    with pytest.raises(WrapError, match=message):
        mixprec.wrap(model, opt, mode="fp8-tensorwise+ao-adamw8bit")
    assert [dict(g) for g in opt.param_groups] == groups_before
    assert not any("Float8" in type(m).__name__ for m in model.modules())


def test_existing_state_is_quantized_into_the_new_optimizer() -> None:
    model = make_wide()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plain = mixprec.wrap(model, opt)  # three plain steps first
    train_wide(plain[0], plain[1], 3)
    model = mixprec.unwrap(plain[0])
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    model, ao = mixprec.wrap(model, opt, mode="32-true+ao-adamw8bit")
    assert "existing Adam state of 4 parameters quantized" in ao.precision.summary
    for p in model.parameters():
        state = ao.state[p]
        assert float(state["step"]) == 3.0
        for key in ("exp_avg", "exp_avg_sq"):
            value = state[key]
            restored = value.dequantize() if hasattr(value, "dequantize") else value
            torch.testing.assert_close(restored, before[p][key], rtol=0.1,
                                       atol=0.02 * float(before[p][key].abs().max()))


def test_lr_schedulers_and_float_lrs_work() -> None:
    model = make_wide()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = mixprec.wrap(model, opt, mode="ao-adamw8bit")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_wide(model, opt, 1)
    scheduler.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(5e-3)
    opt.param_groups[0]["lr"] = 0.0  # a plain float, as a hand-written schedule sets it
    before = [p.detach().clone() for p in model.parameters()]
    train_wide(model, opt, 1)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    # lr 0 still applies no decay and no update
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_add_param_group_after_wrap() -> None:
    model = make_wide()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params[:2], lr=1e-2)
    model, opt = wrap_quiet(model, opt, "fp8-tensorwise+ao-adamw-fp8")
    opt.add_param_group({"params": params[2:], "lr": 1e-3})
    assert float(opt.param_groups[1]["lr"]) == pytest.approx(1e-3)
    train_wide(model, opt, 2)
    assert all(p in opt.state for p in params)


def test_bf16_model_with_masters_steps_fp32_masters() -> None:
    model = make_wide()
    opt = torch.optim.AdamW(model.parameters())
    model, opt = mixprec.wrap(model, opt, mode="bf16-true+ao-adamw4bit", master_weights=True)
    train_wide(model, opt, 2)
    masters = [p for g in opt.param_groups for p in g["params"]]
    assert {p.dtype for p in masters} == {torch.float32}
    assert {type(opt.state[p]["exp_avg"]).__name__ for p in masters if p.numel() >= 4096} == {
        "OptimState4bit"}


def test_stochastic_rounding_option_reaches_torchao() -> None:
    model = make_wide()
    opt = torch.optim.AdamW(model.parameters())
    mode = LowBitAdamW("8bit", block_size=128, bf16_stochastic_round=True)
    model, opt = mixprec.wrap(model, opt, mode=["bf16-true", mode])
    assert opt.optimizer.bf16_stochastic_round is True and opt.optimizer.block_size == 128
    assert "ao-adamw8bit(block_size=128, bf16_stochastic_round=True)" in opt.precision.summary
    train_wide(model, opt, 2)
    assert {type(opt.state[p]["exp_avg"]).__name__ for p in model.parameters()} == {
        "OptimState8bit", "Tensor"}


@pytest.mark.parametrize("mode", OPTIM_MODES)
def test_checkpoint_round_trip_and_exact_resume(mode: str) -> None:
    model = make_wide()
    model, opt = mixprec.wrap(model, torch.optim.AdamW(model.parameters()), mode=f"32-true+{mode}")
    train_wide(model, opt, 2)
    checkpoint = roundtrip(opt.precision.state_dict())
    state = checkpoint["optimizer"]["state"]
    assert all(type(t) is torch.Tensor for s in state.values() for v in s.values()
               for t in (v["tensors"].values() if isinstance(v, dict) else [v]))

    resumed = make_wide(seed=5)
    resumed, ropt = mixprec.wrap(resumed, torch.optim.AdamW(resumed.parameters()),
                                 mode=f"32-true+{mode}")
    resumed.precision.load_state_dict(checkpoint)
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            other = ropt.state[q][key]
            assert type(other) is type(value)
            if hasattr(value, "codes"):
                assert torch.equal(value.codes, other.codes)
                assert torch.equal(value.scale, other.scale)
    train_wide(model, opt, 2)
    train_wide(resumed, ropt, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_checkpoint_loads_without_torchao_imported(tmp_path) -> None:
    model = make_wide()
    model, opt = mixprec.wrap(model, torch.optim.AdamW(model.parameters()), mode="ao-adamw8bit")
    train_wide(model, opt, 1)
    path = tmp_path / "ckpt.pt"
    torch.save(opt.precision.state_dict(), path)
    code = (f"import sys, torch; c = torch.load({str(path)!r}, weights_only=True); "
            "s = c['optimizer']['state'][0]['exp_avg']; "
            "print(s['torchao_optim_state'], 'torchao' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["OptimState8bit", "False"]


def test_loading_a_checkpoint_of_another_mode_is_refused() -> None:
    model = make_mlp()
    model, opt = mixprec.wrap(model, torch.optim.AdamW(model.parameters()), mode="ao-adamw4bit")
    checkpoint = opt.precision.state_dict()
    other = make_mlp()
    other, _ = mixprec.wrap(other, torch.optim.AdamW(other.parameters()),
                                    mode="ao-adamw8bit")
    with pytest.raises(mixprec.exceptions.CheckpointError, match=r"saved in mode "
                                                                 r"'32-true\+ao-adamw4bit'"):
        other.precision.load_state_dict(checkpoint)
