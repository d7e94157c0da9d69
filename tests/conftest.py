"""The core's test models and data. The fresh registry per test and the generic
helpers come from the conformance kit (``mixprec.testing``), as in a plugin's tests."""

from __future__ import annotations

import pytest
import torch

from mixprec.testing import seeded, train_steps

pytest_plugins = ["mixprec.testing"]


class TinyNet(torch.nn.Module):
    """A small model with an embedding, a norm, a buffer and tied head weights."""

    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.fc1 = torch.nn.Linear(dim, 2 * dim)
        self.norm = torch.nn.LayerNorm(2 * dim)
        self.fc2 = torch.nn.Linear(2 * dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("offset", torch.zeros(dim))
        self.label = "tiny"

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.offset
        h = h + self.fc2(torch.relu(self.norm(self.fc1(h))))
        return self.head(h)


def make_batch(seed: int = 0, batch: int = 8, seq: int = 6, vocab: int = 32):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model, tokens, targets):
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def train(model, opt, steps: int, start: int = 0, accumulate: int = 1):
    return train_steps(opt, lambda i: loss_of(model, *make_batch(seed=i)), steps, start=start,
                       accumulate=accumulate)


@pytest.fixture
def tiny():
    return seeded(TinyNet)


@pytest.fixture
def fresh_registry(mixprec_registry):
    """The kit's registry of the test: only the core modes (these tests name it so)."""
    return mixprec_registry


CORE_MODES = [
    ("32-true", {}),
    ("64-true", {}),
    ("16-mixed", {}),
    ("bf16-mixed", {}),
    ("16-true", {}),
    ("bf16-true", {}),
    ("16-true", {"master_weights": True}),
    ("bf16-true", {"master_weights": True}),
]
CORE_IDS = [m + ("+master" if kw else "") for m, kw in CORE_MODES]
