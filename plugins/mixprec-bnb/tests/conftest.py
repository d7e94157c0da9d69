"""Shared models, data and a fresh registry holding only the core and this plugin."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import mixprec_bnb.plugin
import pytest
import torch
from bitsandbytes.optim import GlobalOptimManager

import mixprec

pytest_plugins = ["mixprec.testing"]  # the conformance kit, opt-in

VOCAB, DIM, HIDDEN = 64, 64, 128


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def registry() -> Iterator[mixprec.Registry]:
    """A fresh registry per test: the core modes and this plugin, registered by hand."""
    reg = mixprec.Registry(entry_points=False)
    reg.register(mixprec_bnb.plugin, name="mixprec-bnb", distribution="mixprec-bnb")
    with mixprec.use_registry(reg):
        yield reg


@pytest.fixture(autouse=True)
def global_optim_manager() -> Iterator[GlobalOptimManager]:
    """bitsandbytes' process-wide GlobalOptimManager, emptied again after each test."""
    manager = GlobalOptimManager.get_instance()
    yield manager
    manager.initialize()


class Block(torch.nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class TinyLM(torch.nn.Module):
    """Embedding, two residual MLP blocks, a norm and a head: every Linear weight has
    at least 4096 elements (so 8-bit Adam keeps it in 8 bits)."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList([Block(dim, hidden) for _ in range(2)])
        self.norm = torch.nn.LayerNorm(dim)
        self.lm_head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def make_lm(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def batch(step: int, task: int = 0, size: int = 8, length: int = 16
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of a fixed token task (8 batches, cycled): the target of token t
    is a fixed permutation of t (one per ``task``)."""
    g = torch.Generator().manual_seed(100 * task + step % 8)
    tokens = torch.randint(0, VOCAB, (size, length), generator=g)
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(7 + task))
    return tokens, perm[tokens]


def lm_loss(model: Callable[[torch.Tensor], torch.Tensor], step: int, task: int = 0) -> torch.Tensor:
    tokens, target = batch(step, task)
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), target.reshape(-1))


def train(model: Any, opt: Any, steps: int, start: int = 0, task: int = 0) -> list[float]:
    """``steps`` optimizer steps through ``opt.backward`` when ``opt`` is wrapped."""
    losses = []
    for step in range(start, start + steps):
        loss = lm_loss(model, step, task)
        if hasattr(opt, "backward"):
            opt.backward(loss)
        else:
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def wrap_quiet(model: torch.nn.Module, opt: torch.optim.Optimizer | None, mode: Any,
               **kw: Any) -> Any:
    """wrap() without the frozen-weights warning (tests that check it call wrap directly)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*froze .* Linear weights",
                                category=mixprec.MixprecWarning)
        return mixprec.wrap(model, opt, mode, **kw)


def roundtrip(obj: Any) -> Any:
    """torch.save then torch.load(weights_only=True), as a checkpoint on disk would."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_state_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Same keys, and every tensor equal in dtype, shape and value (bit for bit);
    nested dicts are compared the same way."""
    assert list(a) == list(b)
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            assert_state_equal(x, y)
        elif torch.is_tensor(x):
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert torch.equal(x, y), key
        else:
            assert x == y, key
