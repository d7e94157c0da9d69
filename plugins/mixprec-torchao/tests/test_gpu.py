"""The same checks on a CUDA GPU with FP8 (sm89+): real FP8 tensor-core GEMMs.

Skipped without CUDA; ``scripts/gpu-check`` runs them on an H100/H200.
"""

from __future__ import annotations

import pytest
import torch
from conftest import sqnr
from mixprec_torchao import RECIPES, state_bytes

import mixprec
from mixprec.testing import wrap_quietly as wrap_quiet

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_fp8_gpu() -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.fail(f"{torch.cuda.get_device_name()} has no FP8 tensor cores (needs sm89+)")


@pytest.mark.parametrize("mode", list(RECIPES))
def test_fp8_linear_on_gpu_against_bf16(mode: str, record_property) -> None:
    torch.manual_seed(0)
    fp8 = torch.nn.Sequential(torch.nn.Linear(1024, 2048)).cuda()
    ref = torch.nn.Sequential(torch.nn.Linear(1024, 2048)).cuda()
    ref.load_state_dict(fp8.state_dict())
    x = torch.randn(4, 256, 1024, device="cuda")
    grad = torch.randn(4, 256, 2048, device="cuda")
    results = []
    for model, name in ((fp8, mode), (ref, "bf16-mixed")):
        wrapped = wrap_quiet(model, None, name)
        xi = x.clone().requires_grad_()
        out = wrapped(xi)
        out.backward(grad)
        results.append((out.detach(), xi.grad, model[0].weight.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = results
    db = {"output": sqnr(y_ref, y), "grad_input": sqnr(dx_ref, dx), "grad_weight": sqnr(dw_ref, dw)}
    for key, value in db.items():
        record_property(f"sqnr_db_{key}", round(value, 1))
    print(f"cuda {mode}: " + ", ".join(f"{k} {v:.1f} dB" for k, v in db.items()))
    assert min(db.values()) >= 20.0, db


def test_fp8_tensorwise_trains_like_bf16_mixed_on_gpu() -> None:
    def run(mode: str) -> float:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 512), torch.nn.GELU(),
            torch.nn.Linear(512, 16)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model, opt = wrap_quiet(model, opt, mode)
        teacher = torch.randn(256, 16, generator=torch.Generator().manual_seed(7)).cuda()
        losses = []
        for step in range(150):
            g = torch.Generator().manual_seed(1000 + step % 4)
            x = torch.randn(64, 256, generator=g).cuda()
            loss = torch.nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1))
            opt.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        return sum(losses[-10:]) / 10

    base, fp8 = run("bf16-mixed"), run("fp8-tensorwise")
    print(f"cuda final loss: bf16-mixed {base:.4f}, fp8-tensorwise {fp8:.4f}")
    assert abs(fp8 - base) <= 0.05 * base


@pytest.mark.parametrize("mode", ["ao-adamw8bit", "ao-adamw4bit", "ao-adamw-fp8"])
def test_low_bit_adamw_on_gpu(mode: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024)).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model, opt = wrap_quiet(model, opt, f"fp8-rowwise+{mode}")
    for _ in range(3):
        opt.backward(model(torch.randn(64, 1024, device="cuda")).square().mean())
        opt.step()
        opt.zero_grad()
    n = sum(p.numel() for p in model.parameters())
    per_param = state_bytes(opt) / n
    print(f"cuda {mode}: {per_param:.4f} state bytes/param")
    assert per_param <= {"ao-adamw8bit": 2.1, "ao-adamw4bit": 1.1, "ao-adamw-fp8": 2.1}[mode]
    assert mixprec.is_wrapped(model)
