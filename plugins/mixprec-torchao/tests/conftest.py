"""What is particular to this plugin's tests: the plugin under test, models with
FP8-able (and one non-FP8-able) layer shapes, their data, and SQNR. The fresh
registry per test, the ``gpu`` skip and the generic helpers come from mixprec's
kit (``mixprec.testing``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mixprec_torchao.plugin
import pytest
import torch

from mixprec.testing import seeded, train_steps

pytest_plugins = ["mixprec.testing"]  # the conformance kit, opt-in


@pytest.fixture
def mixprec_plugins() -> Mapping[str, object]:
    """Every test runs in a fresh registry: the core modes and this plugin, by hand."""
    return {"mixprec-torchao": mixprec_torchao.plugin}


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
    return seeded(MLP, n_out, seed=seed)


def batch(step: int, size: int = 32, n_out: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of a small fixed data set (4 batches, cycled): labels from a fixed
    random linear teacher, so the loss goes well down within a hundred steps."""
    g = torch.Generator().manual_seed(1000 + step % 4)
    x = torch.randn(size, 32, generator=g)
    teacher = torch.Generator().manual_seed(7)
    w = torch.randn(32, n_out, generator=teacher)
    return x, (x @ w).argmax(dim=1)


def train(model: Any, opt: Any, steps: int, start: int = 0) -> list[float]:
    """``steps`` optimizer steps of the classification task of :func:`batch`."""

    def loss_at(step: int) -> torch.Tensor:
        x, y = batch(step)
        return torch.nn.functional.cross_entropy(model(x), y)

    return train_steps(opt, loss_at, steps, start=start)


def make_wide(seed: int = 0) -> torch.nn.Module:
    """Two 256x256 layers with bias: weights big enough for quantized optimizer state
    (>= 4096 elements), and only two parameter shapes, so torchao's compiled optimizer
    step compiles few graphs (the first run on a machine compiles them all)."""
    return seeded(lambda: torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(),
                                              torch.nn.Linear(256, 256)), seed=seed)


def train_wide(model: Any, opt: Any, steps: int, start: int = 0,
               poison: bool = False) -> list[float]:
    """Steps of a regression on fixed random data; ``poison`` puts an inf in the input."""

    def loss_at(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step % 4)
        x = torch.randn(8, 256, generator=g)
        if poison:
            x[0, 0] = float("inf")
        return (model(x) - x).square().mean()

    return train_steps(opt, loss_at, steps, start=start)


def sqnr(reference: torch.Tensor, value: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``value`` against ``reference``, in dB."""
    ref = reference.detach().double()
    noise = (ref - value.detach().double()).norm()
    return float(20 * torch.log10(ref.norm() / noise))
