from __future__ import annotations

import pytest
import torch

import mixprec


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
    losses = []
    for step in range(start, start + steps):
        for micro in range(accumulate):
            tokens, targets = make_batch(seed=step * accumulate + micro)
            loss = loss_of(model, tokens, targets) / accumulate
            opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()) * accumulate)
    return losses


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def fresh_registry():
    """A registry with only the core modes; plugins registered by hand are removed after."""
    with mixprec.use_registry(mixprec.Registry(entry_points=False)) as reg:
        yield reg


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
