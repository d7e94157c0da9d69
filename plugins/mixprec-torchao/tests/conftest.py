"""Shared models, data and a fresh registry holding only the core and this plugin."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from typing import Any

import mixprec_torchao.plugin
import pytest
import torch

import mixprec

pytest_plugins = ["mixprec.testing"]  # the conformance kit, opt-in


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu-check on an H100/H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def registry() -> Iterator[mixprec.Registry]:
    """A fresh registry per test: the core modes and this plugin, registered by hand."""
    reg = mixprec.Registry(entry_points=False)
    reg.register(mixprec_torchao.plugin, name="mixprec-torchao", distribution="mixprec-torchao")
    with mixprec.use_registry(reg):
        yield reg


class MLP(torch.nn.Module):
    """dims 32 -> 64 -> 64 -> 16 (all FP8-able) and a 16 -> 10 head (not: 10 % 16 != 0)."""

    def __init__(self, n_out: int = 10) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.GELU(),
            torch.nn.Linear(64, 64), torch.nn.GELU(),
            torch.nn.Linear(64, 16),
        )
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(x)))


def make_mlp(seed: int = 0, n_out: int = 10) -> MLP:
    torch.manual_seed(seed)
    return MLP(n_out)


def batch(step: int, size: int = 32, n_out: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of a small fixed data set (4 batches, cycled): labels from a fixed
    random linear teacher, so the loss goes well down within a hundred steps."""
    g = torch.Generator().manual_seed(1000 + step % 4)
    x = torch.randn(size, 32, generator=g)
    teacher = torch.Generator().manual_seed(7)
    w = torch.randn(32, n_out, generator=teacher)
    return x, (x @ w).argmax(dim=1)


def train(model: Any, opt: Any, steps: int, start: int = 0) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def make_wide(seed: int = 0) -> torch.nn.Module:
    """Two 256x256 layers with bias: weights big enough for quantized optimizer state
    (>= 4096 elements), and only two parameter shapes, so torchao's compiled optimizer
    step compiles few graphs (the first run on a machine compiles them all)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(),
                               torch.nn.Linear(256, 256))


def train_wide(model: Any, opt: Any, steps: int, start: int = 0,
               poison: bool = False) -> list[float]:
    """Steps of a regression on fixed random data; ``poison`` puts an inf in the input."""
    losses = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step % 4)
        x = torch.randn(8, 256, generator=g)
        if poison:
            x[0, 0] = float("inf")
        loss = (model(x) - x).square().mean()
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def wrap_quiet(model: torch.nn.Module, opt: torch.optim.Optimizer | None, mode: Any, **kw: Any) -> Any:
    """wrap() without the kept-layer warning (tests that check it call wrap directly)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=mixprec.MixprecWarning)
        return mixprec.wrap(model, opt, mode=mode, **kw)


def roundtrip(obj: Any) -> Any:
    """torch.save then torch.load(weights_only=True), as a checkpoint on disk would go."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def sqnr(reference: torch.Tensor, value: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``value`` against ``reference``, in dB."""
    ref = reference.detach().double()
    noise = (ref - value.detach().double()).norm()
    return float(20 * torch.log10(ref.norm() / noise))
