"""The wrapper's overhead: mixprec against the same training loop written in plain torch.

For each core mode, the hand-written loop does what a careful user would write
without mixprec (``.to(dtype)``, ``torch.autocast``, ``torch.amp.GradScaler``,
manual loss scaling with fp32 optimizer math for ``16-true``), with the same
model, data, AdamW and gradient clipping. Both run interleaved; the ratio of
median step times is the wrapper's cost. Target: ratio <= 1.03.

    python benchmarks/overhead.py                       # numbers (idle machine)
    python benchmarks/overhead.py --size tiny --steps 3 --repeats 2 --tag smoke
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

import mixprec
from mixprec._bench.model import BenchGPT

MODES = ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"]
TARGET = 1.03
LR, CLIP = 3e-3, 1.0


def _adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)


class PlainLoop:
    """One core mode written by hand in plain torch."""

    def __init__(self, mode: str, model: torch.nn.Module, device: torch.device) -> None:
        self.mode = mode
        self.device = device
        dtype = {"64-true": torch.float64, "bf16-true": torch.bfloat16,
                 "16-true": torch.float16}.get(mode)
        if dtype is not None:
            model.to(dtype)
        self.model = model
        self.params = list(model.parameters())
        self.opt = _adamw(self.params)
        self.autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(mode)
        self.grad_scaler = torch.amp.GradScaler(device.type) if mode == "16-mixed" else None
        self.scale = 2.0**16  # 16-true: dynamic loss scale, GradScaler's defaults
        self.good_steps = 0

    def forward_loss(self, batch: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
               else contextlib.nullcontext())
        with ctx:
            logits = self.model(batch[:, :-1])
        if logits.dtype != torch.float64:
            logits = logits.float()  # mixprec returns fp32 outputs; do the same work
        return _common.lm_loss(logits, batch[:, 1:])

    def step(self, batch: torch.Tensor) -> float:
        loss = self.forward_loss(batch)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, CLIP)
            self.grad_scaler.step(self.opt)
            self.grad_scaler.update()
        elif self.mode == "16-true":
            self._fp16_true_step(loss)
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, CLIP)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _fp16_true_step(self, loss: torch.Tensor) -> None:
        # fp16 weights; Adam in fp16 goes NaN (eps=1e-8 is 0 in fp16), so the step
        # runs on fp32 copies of parameters and gradients and rounds back.
        (loss * self.scale).backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        found = torch.zeros(1)
        torch._amp_foreach_non_finite_check_and_unscale_(
            grads, found, torch.full((1,), 1.0 / self.scale))
        if found.item():
            self.scale /= 2
            self.good_steps = 0
            return
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        for p in self.params:
            p.data, p.grad = p.data.float(), p.grad.float()
        self.opt.step()
        for p in self.params:
            p.grad = None
            p.data = p.data.half()
        self.good_steps += 1
        if self.good_steps == 2000:
            self.scale, self.good_steps = self.scale * 2, 0


class MixprecLoop:
    """The same loop through ``mixprec.wrap``."""

    def __init__(self, mode: str, model: torch.nn.Module, **options) -> None:
        self.model, self.opt = mixprec.wrap(model, _adamw(model.parameters()), mode=mode,
                                            **options)

    def step(self, batch: torch.Tensor) -> float:
        loss = _common.lm_step(self.model, batch)
        self.opt.backward(loss)
        self.opt.clip_grad_norm_(CLIP)
        self.opt.step()
        self.opt.zero_grad()
        return float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.common_args(parser)
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated core modes (default {','.join(MODES)})")
    args = parser.parse_args(argv)
    size = _common.size_of(args)
    device = torch.device(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    torch.manual_seed(args.seed)
    with torch.device(device):
        base = BenchGPT(size)
    steps: dict[str, _common.Step] = {}
    for mode in modes:
        steps[f"{mode}/torch"] = PlainLoop(mode, copy.deepcopy(base), device).step
        steps[f"{mode}/mixprec"] = MixprecLoop(mode, copy.deepcopy(base)).step
        steps[f"{mode}/mixprec-noskip"] = MixprecLoop(
            mode, copy.deepcopy(base), skip_nonfinite=False).step
    data = _common.batches(size, args.warmup + args.steps * args.repeats, args.seed, device)
    timings = _common.time_interleaved(steps, data, warmup=args.warmup, timed=args.steps,
                                       repeats=args.repeats, device=device)

    rows, results = [], []
    for mode in modes:
        plain, wrapped, noskip = (timings[f"{mode}/{k}"]
                                  for k in ("torch", "mixprec", "mixprec-noskip"))
        entry = {"mode": mode}
        for key, t in (("torch", plain), ("mixprec", wrapped), ("mixprec_noskip", noskip)):
            entry[key] = {"median_ms": t.median_ms, "repeat_medians_ms": t.repeat_medians,
                          "final_loss": t.losses[-1] if t.losses else None, "error": t.error}
        ratio = (wrapped.median_ms / plain.median_ms
                 if wrapped.median_ms and plain.median_ms else None)
        ratio_noskip = (noskip.median_ms / plain.median_ms
                        if noskip.median_ms and plain.median_ms else None)
        per_repeat = [w / p for w, p in zip(wrapped.repeat_medians, plain.repeat_medians)]
        same_losses = plain.losses == wrapped.losses
        entry.update(ratio=ratio, ratio_noskip=ratio_noskip, ratio_per_repeat=per_repeat,
                     meets_target=None if ratio is None else ratio <= TARGET,
                     identical_losses=same_losses)
        results.append(entry)
        spread = (f"{min(per_repeat):.3f}–{max(per_repeat):.3f}" if per_repeat else "—")
        rows.append([mode, _common.fmt(plain.median_ms), _common.fmt(wrapped.median_ms),
                     _common.fmt(ratio, 3), spread, _common.fmt(ratio_noskip, 3),
                     "yes" if ratio is not None and ratio <= TARGET else "**no**",
                     "yes" if same_losses else "no",
                     _common.short(plain.error or wrapped.error or noskip.error)])
    table = _common.markdown_table(
        ["mode", "torch ms", "mixprec ms", "ratio", "ratio per repeat",
         "ratio, skip_nonfinite=False", f"≤ {TARGET}", "same losses", "error"], rows)
    notes = [
        "ms: median step time (forward, backward, clip_grad_norm_, AdamW step, zero_grad) "
        f"over {args.repeats} repeats x {args.steps} steps after {args.warmup} warm-up steps; "
        "implementations interleaved, order rotating each repeat.",
        "ratio: mixprec / torch. mixprec checks gradients for inf/NaN in every mode by "
        "default (skip_nonfinite=True, one read of the gradients); the next column turns "
        "that off, as the plain loops for non-fp16 modes do not check.",
        "same losses: mixprec's per-step losses equal the hand-written loop's exactly.",
    ]
    _common.write_results("overhead", args, {"size": vars(size), "target": TARGET,
                                             "results": results}, table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
