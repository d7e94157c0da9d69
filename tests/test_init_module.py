from __future__ import annotations

import pytest
import torch
from conftest import TinyNet
from torch.utils._python_dispatch import TorchDispatchMode

import mixprec


class _AllocationLog(TorchDispatchMode):
    """Records the dtype and size of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.created: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.created.append((t.dtype, t.numel()))
        return out


@pytest.mark.parametrize(("mode", "dtype"), [("bf16-true", torch.bfloat16), ("16-true", torch.float16),
                                             ("64-true", torch.float64), ("bf16-mixed", torch.float32),
                                             ("32-true", torch.float32)])
def test_models_are_built_in_the_modes_dtype(mode, dtype):
    with mixprec.init_module(mode) as precision:
        model = TinyNet()
    assert all(p.dtype is dtype for p in model.parameters())
    assert torch.get_default_dtype() is torch.float32
    wrapped = precision.wrap(model)
    assert wrapped(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 32)


def test_a_bf16_model_never_exists_in_fp32():
    with _AllocationLog() as log, mixprec.init_module("bf16-true"):
        torch.nn.Linear(256, 256)
    big_fp32 = [n for dtype, n in log.created if dtype is torch.float32 and n > 256]
    assert big_fp32 == []
    assert (torch.bfloat16, 256 * 256) in log.created


def test_init_on_meta_then_load_a_checkpoint():
    torch.manual_seed(0)
    source = TinyNet()
    with mixprec.init_module("bf16-true", device="meta") as precision:
        model = TinyNet()
    assert all(p.is_meta and p.dtype is torch.bfloat16 for p in model.parameters())
    model = model.to_empty(device="cpu")
    wrapped = precision.wrap(model)
    wrapped.load_state_dict(source.state_dict())
    assert torch.equal(wrapped.fc1.weight, source.fc1.weight.detach().bfloat16())


def test_default_dtype_is_restored_after_an_error():
    with pytest.raises(RuntimeError, match="inside"), mixprec.init_module("16-true"):
        assert torch.get_default_dtype() is torch.float16
        raise RuntimeError("inside")
    assert torch.get_default_dtype() is torch.float32


def test_the_wrapper_bound_form():
    precision = mixprec.PrecisionWrapper("bf16-true", master_weights=True)
    with precision.init_module():
        model = TinyNet()
    model, opt = precision.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(p.dtype is torch.float32 for g in opt.param_groups for p in g["params"])
    assert all(p.dtype is torch.bfloat16 for p in model.parameters())
