"""What is particular to this plugin's tests: the plugin under test, bitsandbytes'
process-wide optimizer manager, a model and data sized for 8-bit state, and the
warning these tests expect. The fresh registry per test, the ``gpu`` skip and
the generic helpers come from mixprec's kit (``mixprec.testing``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import mixprec_bnb.plugin
import pytest
import torch
from bitsandbytes.optim import GlobalOptimManager

from mixprec.testing import seeded, train_steps, wrap_quietly

pytest_plugins = ["mixprec.testing"]  # the conformance kit, opt-in

VOCAB, DIM, HIDDEN = 64, 64, 128


@pytest.fixture
def mixprec_plugins() -> Mapping[str, object]:
    """Every test runs in a fresh registry: the core modes and this plugin, by hand."""
    return {"mixprec-bnb": mixprec_bnb.plugin}


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
    return seeded(TinyLM, seed=seed)


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
    """``steps`` optimizer steps of token task ``task`` (wrapped or plain ``opt``)."""
    return train_steps(opt, lambda step: lm_loss(model, step, task), steps, start=start)


def wrap_quiet(model: torch.nn.Module, opt: torch.optim.Optimizer | None, mode: Any,
               **kw: Any) -> Any:
    """wrap() without the frozen-weights warning (tests that check it call wrap directly)."""
    return wrap_quietly(model, opt, mode, silence=".*froze .* Linear weights", **kw)
