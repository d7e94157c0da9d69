"""The real Transformer Engine on an FP8 GPU (compute capability >= 8.9).

Skipped without one; run them with ``plugins/mixprec-te/scripts/gpu-check``.
Bounds are relative errors in the Frobenius norm against the same model in
plain torch bf16 autocast: FP8 E4M3 keeps 3 mantissa bits (a relative rounding
error of up to 6% per element, about 2% RMS), E5M2 gradients 2.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import mixprec


def _why_not() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:
        return f"Transformer Engine is not importable ({type(exc).__name__}: {exc})"
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        return f"{torch.cuda.get_device_name()} has compute capability {capability}; FP8 needs 8.9"
    return None


REASON = _why_not()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

DIM = 256


class MLP(torch.nn.Module):
    def __init__(self, dim: int = DIM, out: int = DIM) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.fc1 = torch.nn.Linear(dim, 2 * dim)
        self.fc2 = torch.nn.Linear(2 * dim, dim)
        self.out = torch.nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        return self.out(h)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(16, 32, DIM, device="cuda", generator=g)
    w = torch.randn(DIM, DIM, device="cuda", generator=g) / DIM**0.5
    return x, torch.tanh(x @ w)


def test_fp8_forward_and_backward_against_bf16():
    torch.manual_seed(0)
    ref = MLP().cuda()
    model = mixprec.wrap(copy.deepcopy(ref), mode="transformer-engine")
    x, _ = data()
    for _ in range(3):  # delayed scaling: scales come from the amax history of earlier steps
        model(x).float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
    y = model(x)
    y.float().pow(2).mean().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref = ref(x)
    y_ref.float().pow(2).mean().backward()
    err = rel(y, y_ref)
    print(f"FP8 forward relative error vs bf16: {err:.4f}")
    assert 0.005 < err < 0.08  # above bf16's own ~1e-3: the GEMMs really ran in FP8
    for name in ("fc1", "fc2", "out"):
        g = model.get_submodule(name).weight.grad
        g_ref = ref.get_submodule(name).weight.grad
        err = rel(g, g_ref)
        print(f"FP8 {name}.weight gradient relative error vs bf16: {err:.4f}")
        assert err < 0.2, name


@pytest.mark.parametrize("mode", ["transformer-engine", "transformer-engine-float16"])
def test_loss_falls(mode):
    torch.manual_seed(0)
    model = MLP().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = mixprec.wrap(model, opt, mode=mode)
    x, y = data()
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"{mode}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, skipped {opt.precision.skipped_steps}")
    assert losses[-1] < 0.3 * losses[0]
    assert opt.precision.skipped_steps <= 3  # fp16: the first steps may find the scale


def _fp8_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = layer.get_extra_state()
    loaded = pickle.loads(bytes(state.detach().cpu().tolist())) if state.numel() else {}
    return {k: v for k, v in (loaded or {}).items() if isinstance(v, torch.Tensor)}


def _trained(recipe):
    torch.manual_seed(0)
    model = MLP().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = mixprec.wrap(model, opt, mode="transformer-engine", recipe=recipe)
    x, y = data()
    for _ in range(4):
        opt.backward(torch.nn.functional.mse_loss(model(x), y))
        opt.step()
        opt.zero_grad()
    buf = io.BytesIO()
    torch.save(opt.precision.state_dict(), buf)
    buf.seek(0)
    return model, torch.load(buf, weights_only=True), x, y


def _fresh(recipe):
    torch.manual_seed(1)
    model = MLP().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return mixprec.wrap(model, opt, mode="transformer-engine", recipe=recipe)


def test_checkpoint_round_trip_keeps_fp8_state(monkeypatch):
    monkeypatch.setenv("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE", "1")  # our own checkpoint
    recipe = {"amax_history_len": 16}
    model, loaded, x, y = _trained(recipe)
    assert loaded["model"]["fc1._extra_state"].numel() > 0
    model2, opt2 = _fresh(recipe)
    opt2.precision.load_state_dict(loaded)
    for name in ("fc1", "fc2", "out"):
        saved = _fp8_tensors(model.get_submodule(name))
        restored = _fp8_tensors(model2.get_submodule(name))
        assert saved.keys() == restored.keys() and saved, name
        for key in saved:
            assert torch.equal(saved[key].cpu(), restored[key].cpu()), (name, key)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), name
    a = [torch.nn.functional.mse_loss(model(x), y).item() for _ in range(2)]
    b = [torch.nn.functional.mse_loss(model2(x), y).item() for _ in range(2)]
    torch.testing.assert_close(a, b, rtol=1e-3, atol=0)


def test_a_layer_fp8_cannot_take_stays_and_is_named():
    model = MLP(out=100).cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mixprec.wrap(model, mode="transformer-engine")
    messages = [str(w.message) for w in caught if issubclass(w.category, mixprec.MixprecWarning)]
    assert len(messages) == 1 and "out (in_features=256, out_features=100)" in messages[0]
    assert type(model.out) is torch.nn.Linear
    x, _ = data()
    assert model(x).shape == (16, 32, 100)


def test_init_module_builds_te_layers_on_the_gpu():
    import transformer_engine.pytorch as te

    with mixprec.init_module("transformer-engine") as precision:
        model = MLP(out=100)
    assert type(model.fc1) is te.Linear and type(model.out) is torch.nn.Linear
    assert model.fc1.weight.device.type == "cuda" and model.fc1.weight.dtype is torch.bfloat16
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixprec.MixprecWarning)
        model, opt = precision.wrap(model, opt)
    x, _ = data()
    opt.backward(model(x).float().pow(2).mean())
    opt.step()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_models_own_gpu():
    torch.manual_seed(0)
    model = mixprec.wrap(MLP().to("cuda:1"), mode="transformer-engine")
    x, _ = data()
    y = model(x.to("cuda:1"))
    assert y.device == torch.device("cuda", 1)


def test_te_refusing_pickled_state_is_a_clear_error(monkeypatch):
    from mixprec_te._te import extra_state_refusal

    from mixprec.exceptions import CheckpointError

    monkeypatch.delenv("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE", raising=False)
    recipe = {"amax_history_len": 16}
    _, loaded, _, _ = _trained(recipe)
    if extra_state_refusal(loaded["model"]["fc1._extra_state"], "fc1") is None:
        pytest.skip("this Transformer Engine loads pickled FP8 state without an opt-in")
    model2, opt2 = _fresh(recipe)
    before = model2.fc1.weight.detach().clone()
    with pytest.raises(CheckpointError, match="NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1"):
        opt2.precision.load_state_dict(loaded)
    assert torch.equal(model2.fc1.weight, before)


def test_current_scaling_round_trip():
    from transformer_engine.common import recipe as te_recipe

    if not hasattr(te_recipe, "Float8CurrentScaling"):
        pytest.skip("this Transformer Engine has no Float8CurrentScaling")
    recipe = {"scaling": "current"}
    model, loaded, x, _ = _trained(recipe)
    model2, opt2 = _fresh(recipe)
    opt2.precision.load_state_dict(loaded)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), name
    torch.testing.assert_close(model(x), model2(x), rtol=0, atol=0)
