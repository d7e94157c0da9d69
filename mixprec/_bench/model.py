"""The model and the task ``mixprec bench`` trains: a small GPT on a Markov source.

The task is a deterministic synthetic language whose best possible loss is
known exactly, so a loss in the table reads against a floor, not in a vacuum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PRESETS", "BenchGPT", "BenchSize", "MarkovTask", "lm_loss", "lora_targets", "parse_size"]


@dataclass(frozen=True)
class BenchSize:
    """Shape of the bench model and of one batch.

    :param vocab: tokens in the vocabulary (and in the task).
    :param dim: model width; a multiple of ``heads`` (and of 16 for FP8 layers).
    :param layers: transformer blocks.
    :param heads: attention heads.
    :param seq: tokens per sequence.
    :param batch: sequences per step.
    :param tied: share the embedding matrix with the output head.
    """

    vocab: int = 128
    dim: int = 128
    layers: int = 4
    heads: int = 4
    seq: int = 64
    batch: int = 16
    tied: bool = False

    def describe(self) -> str:
        head = "tied head" if self.tied else "separate head"
        return (f"GPT vocab={self.vocab} dim={self.dim} layers={self.layers} heads={self.heads} "
                f"({head}); batch {self.batch} x {self.seq} tokens")


PRESETS: dict[str, BenchSize] = {
    "tiny": BenchSize(vocab=64, dim=32, layers=1, heads=2, seq=16, batch=8),
    "small": BenchSize(vocab=128, dim=64, layers=2, heads=4, seq=64, batch=16),
    "medium": BenchSize(vocab=256, dim=256, layers=4, heads=8, seq=128, batch=32),
}


def parse_size(text: str) -> BenchSize:
    """``"small"``, ``"tiny,layers=2"`` or ``"dim=96,layers=3"`` (based on ``small``).

    Raises ``ValueError`` with the accepted forms on anything else.
    """
    keys = {f.name for f in fields(BenchSize)}
    size = PRESETS["small"]
    changes: dict[str, int | bool] = {}
    for index, part in enumerate(p.strip() for p in text.split(",")):
        if index == 0 and part in PRESETS:
            size = PRESETS[part]
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in keys:
            raise ValueError(
                f"Cannot read size {text!r}: {part!r} is neither a preset "
                f"({', '.join(PRESETS)}) nor key=value with a key among {', '.join(sorted(keys))}; "
                "write e.g. 'small' or 'tiny,layers=2' or 'dim=96,heads=4'."
            )
        if key == "tied":
            if value.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"Cannot read size {text!r}: tied takes true or false.")
            changes[key] = value.strip().lower() in ("true", "1")
            continue
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"Cannot read size {text!r}: {key} needs a whole number, "
                             f"got {value!r}.") from None
        if number < 1:
            raise ValueError(f"Cannot read size {text!r}: {key} must be at least 1.")
        changes[key] = number
    size = replace(size, **changes)  # type: ignore[arg-type]
    if size.dim % size.heads:
        raise ValueError(f"Cannot use size {text!r}: dim={size.dim} is not a multiple of "
                         f"heads={size.heads}; change one of them.")
    if size.vocab < 8 or size.seq < 2:
        raise ValueError(f"Cannot use size {text!r}: the task needs vocab >= 8 and seq >= 2.")
    return size


# -- model ----------------------------------------------------------------------------------


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # 2-D inputs only: some quantized layers (bitsandbytes' Linear8bitLt on the CPU)
    # fail on 3-D inputs, and flattening costs nothing.
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = _linear(self.qkv, self.ln1(x)).view(b, t, 3, self.heads, c // self.heads) \
            .permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + _linear(self.proj, y.transpose(1, 2).reshape(b, t, c))
        return x + _linear(self.fc2, F.gelu(_linear(self.fc1, self.ln2(x))))


class BenchGPT(nn.Module):
    """A small GPT: token and position embeddings, pre-norm blocks, a final norm and a head.

    Only ``nn.Embedding``, ``nn.Linear`` and ``nn.LayerNorm`` hold parameters, so
    every mode that swaps or casts standard layers applies. ``forward(tokens)``
    returns logits of shape ``(batch, seq, vocab)``.
    """

    def __init__(self, size: BenchSize) -> None:
        super().__init__()
        self.size = size
        self.tok = nn.Embedding(size.vocab, size.dim)
        self.pos = nn.Embedding(size.seq, size.dim)
        self.blocks = nn.ModuleList(Block(size.dim, size.heads) for _ in range(size.layers))
        self.ln_f = nn.LayerNorm(size.dim)
        self.head = nn.Linear(size.dim, size.vocab, bias=False)
        if size.tied:
            self.head.weight = self.tok.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation (residual projections scaled by depth).

        Weights that are not floating point (quantized as they were created, inside
        ``mixprec.init_module("nf4")``) keep the values their layer gave them.
        """
        for name, p in self.named_parameters():
            if not p.is_floating_point():
                continue
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * self.size.layers) if name.endswith(
                    ("proj.weight", "fc2.weight")) else 0.02
                p.normal_(0.0, std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return _linear(self.head, self.ln_f(x))


def lora_targets() -> list[str]:
    """The Linear layers LoRA adapters go on in the fine-tune runs (not the head)."""
    return ["qkv", "proj", "fc1", "fc2"]


# -- task -----------------------------------------------------------------------------------


class MarkovTask:
    """A second-order Markov source over ``vocab`` tokens.

    The next token depends on the previous token and on the parity of the one
    before it: each of the ``2 * vocab`` contexts has 4 successors with fixed
    random probabilities. Learning it needs the token embedding, the head and
    attention to the position two back, so a model's loss falls from
    ``ln(vocab)`` toward the source's entropy, which :meth:`floor` computes exactly.
    """

    SUCCESSORS = 4

    def __init__(self, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        k = self.SUCCESSORS
        self.succ = torch.stack([torch.randperm(vocab, generator=g)[:k]
                                 for _ in range(2 * vocab)]).view(vocab, 2, k)
        probs = torch.rand(vocab, 2, k, generator=g, dtype=torch.float64) + 0.25
        self.probs = probs / probs.sum(-1, keepdim=True)
        # Dense next-token distributions per context, for the floor.
        dense = torch.zeros(vocab, 2, vocab, dtype=torch.float64)
        dense.scatter_(2, self.succ, self.probs)
        self.dense = dense

    def sample(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``batch`` sequences of ``length`` tokens (int64)."""
        out = torch.empty(batch, length, dtype=torch.long)
        out[:, 0] = torch.randint(0, self.vocab, (batch,), generator=generator)
        parity = torch.randint(0, 2, (batch,), generator=generator)  # of a token before the start
        for t in range(1, length):
            prev = out[:, t - 1]
            if t >= 2:
                parity = out[:, t - 2] % 2
            choice = torch.multinomial(self.probs[prev, parity].float(), 1, generator=generator)
            out[:, t] = self.succ[prev, parity].gather(1, choice).squeeze(1)
        return out

    def batches(self, count: int, batch: int, seq: int, seed: int) -> torch.Tensor:
        """``count`` batches of ``batch`` sequences with ``seq + 1`` tokens each."""
        g = torch.Generator().manual_seed(seed)
        return self.sample(count * batch, seq + 1, g).view(count, batch, seq + 1)

    def floor(self, data: torch.Tensor) -> float:
        """The expected loss (nats/token) of the best possible model on ``data``'s targets.

        The first target of a sequence does not see the token before the start,
        so its best prediction is the mixture over both parities.
        """
        tokens = data.reshape(-1, data.shape[-1])
        entropy = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.float64)

        def h(p: torch.Tensor) -> torch.Tensor:
            return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)

        entropy[:, 0] = h(self.dense[tokens[:, 0]].mean(1))
        if tokens.shape[1] > 2:
            entropy[:, 1:] = h(self.dense[tokens[:, 1:-1], tokens[:, :-2] % 2])
        return float(entropy.mean())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy, computed in fp32 (or fp64 when the logits are)."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
