"""QLoRA on a tiny Llama: the loss with ``lm_head`` kept in full precision (the default of
the 4/8-bit modes) against ``quantize_lm_head=True``.

    python plugins/mixprec-bnb/benchmarks/lm_head.py              # nf4-dq, 3 seeds
    python plugins/mixprec-bnb/benchmarks/lm_head.py --mode int8 --seeds 1

A Llama built from its config (vocab 128, hidden 64, 2 layers; nothing is downloaded)
is pretrained in fp32 on a second-order Markov source, then fine-tuned with LoRA
(rank 8 on every projection but the head, as QLoRA recipes do) on a base that is fp32,
quantized with the head kept, or quantized with the head too. Every run sees the same
batches; the loss is the mean next-token cross entropy on held-out batches (nats/token),
next to the source's entropy (the best possible loss).
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch

import mixprec

VOCAB, SEQ, BATCH = 128, 32, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Markov:
    """Second-order source: the next token depends on the last token and the parity of the
    one before; each context has 4 successors with fixed random probabilities."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.succ = torch.stack([torch.randperm(VOCAB, generator=g)[:4] for _ in range(2 * VOCAB)])
        probs = torch.rand(2 * VOCAB, 4, generator=g, dtype=torch.float64) + 0.25
        self.probs = probs / probs.sum(-1, keepdim=True)

    def floor(self) -> float:
        """The source's entropy rate: each context's entropy, weighted by how often the
        context occurs (the stationary distribution of the chain of contexts)."""
        moves = torch.zeros(2 * VOCAB, 2 * VOCAB, dtype=torch.float64)
        for ctx in range(2 * VOCAB):
            for succ, prob in zip(self.succ[ctx].tolist(), self.probs[ctx].tolist()):
                moves[ctx, 2 * succ + (ctx // 2) % 2] += prob
        weights = torch.full((2 * VOCAB,), 1 / (2 * VOCAB), dtype=torch.float64)
        for _ in range(2000):
            weights = weights @ moves
        return float((weights * -(self.probs * self.probs.log()).sum(-1)).sum())

    def batch(self, step: int, stream: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * stream + step)
        out = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
        out[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=g)
        parity = torch.randint(0, 2, (BATCH,), generator=g)
        for t in range(1, SEQ + 1):
            ctx = out[:, t - 1] * 2 + parity
            pick = torch.multinomial(self.probs[ctx].float(), 1, generator=g).squeeze(1)
            parity = out[:, t - 1] % 2
            out[:, t] = self.succ[ctx, pick]
        return out


def loss_of(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def pretrained(seed: int, task: Markov, steps: int) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        loss_of(model, task.batch(step, 0)).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


def finetune(state: dict[str, torch.Tensor], mode: str | None, quantize_lm_head: bool,
             task: Markov, steps: int, seed: int) -> float:
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False))
    model.load_state_dict(state)
    if mode is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mixprec.MixprecWarning)  # weights frozen
            model = mixprec.unwrap(mixprec.wrap(model, mode=mode,
                                                quantize_lm_head=quantize_lm_head))
    torch.manual_seed(seed + 1)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        loss_of(lora, task.batch(step, 1)).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return sum(float(loss_of(lora, task.batch(step, 2))) for step in range(8)) / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="nf4-dq")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain", type=int, default=150)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    rows: dict[str, list[float]] = {"fp32 base": [], f"{args.mode}, lm_head kept": [],
                                    f"{args.mode}, lm_head quantized": []}
    task = Markov(0)
    for seed in range(args.seeds):
        state = pretrained(seed, task, args.pretrain)
        runs = [(None, False), (args.mode, False), (args.mode, True)]
        for label, (mode, head) in zip(rows, runs):
            rows[label].append(finetune(state, mode, head, task, args.steps, seed))
    print(f"held-out loss after a LoRA fine-tune (nats/token; floor {task.floor():.3f}, "
          f"uniform {math.log(VOCAB):.3f}), {args.seeds} seed(s):")
    for label, losses in rows.items():
        each = ", ".join(f"{x:.3f}" for x in losses)
        print(f"  {label:<28} {sum(losses) / len(losses):.3f}   ({each})")


if __name__ == "__main__":
    main()
