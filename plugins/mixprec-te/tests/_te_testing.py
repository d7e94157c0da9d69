"""Helpers shared by the CPU tests: a small model, data, and the CPU test mode."""

from __future__ import annotations

from typing import Any

import torch
from mixprec_te import TransformerEngineMode


class CpuTestMode(TransformerEngineMode):
    """The real mode with only its hardware check lifted, so that the wrapper's
    plumbing (optimizer remap, forward contexts, checkpoints) runs on the CPU with
    the stand-in. The hardware check itself is tested in test_te_checks.py."""

    hardware_checks: list[torch.device]

    def _check_hardware(self, te: Any, device: torch.device, recipe: Any) -> None:
        self.hardware_checks = [*getattr(self, "hardware_checks", []), device]


class Net(torch.nn.Module):
    """Embedding, LayerNorm, two FP8-able Linears (one without bias), RMSNorm, and a
    head whose 20 outputs FP8 GEMMs cannot take."""

    def __init__(self, dim: int = 32, vocab: int = 20) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim, bias=False)
        )
        self.rms = torch.nn.RMSNorm(dim, eps=1e-6)
        self.head = torch.nn.Linear(dim, vocab)
        self.register_buffer("gain", torch.ones(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) * self.gain
        h = h + self.mlp(self.norm(h))
        return self.head(self.rms(h))


def batch(seed: int, n: int = 4, seq: int = 4, vocab: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model: torch.nn.Module, seed: int) -> torch.Tensor:
    tokens, targets = batch(seed)
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


