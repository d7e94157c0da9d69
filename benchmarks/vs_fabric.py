"""mixprec against Lightning Fabric, for every mode both have.

The same model, data, AdamW and gradient clipping, once through ``mixprec.wrap``
and once through ``Fabric(precision=...)`` (``fabric.setup``, ``fabric.backward``,
``fabric.clip_gradients``), interleaved. Quantized modes (``BitsandbytesPrecision``
against mixprec-bnb, when installed) train LoRA adapters (peft) on the frozen
quantized model on both sides, with the same compute dtype. Target: mixprec's
step time <= Fabric's.

    pip install "lightning-fabric>=2.6" peft
    python benchmarks/vs_fabric.py
    python benchmarks/vs_fabric.py --size tiny --steps 3 --repeats 2 --tag smoke
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

import mixprec
from mixprec._bench.model import BenchGPT, lora_targets

CORE = ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"]
#: bitsandbytes modes both have, and the compute dtype Lightning accepts for each.
BNB = {"nf4": torch.bfloat16, "nf4-dq": torch.bfloat16, "fp4": torch.bfloat16,
       "fp4-dq": torch.bfloat16, "int8": torch.float16, "int8-training": torch.float16}
FROZEN = {"nf4", "nf4-dq", "fp4", "fp4-dq", "int8"}
LR, CLIP = 3e-3, 1.0


def _adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)


def _lora(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets())
    return peft.get_peft_model(model, config)


class MixprecLoop:
    def __init__(self, mode: str, model: torch.nn.Module, seed: int, **options: Any) -> None:
        if mode in FROZEN:
            model = _lora(model, seed)
        params = [p for p in model.parameters() if p.requires_grad]
        self.model, self.opt = mixprec.wrap(model, _adamw(params), mode=mode, **options)
        self.ran = mode

    def step(self, batch: torch.Tensor) -> float:
        loss = _common.lm_step(self.model, batch)
        self.opt.backward(loss)
        self.opt.clip_grad_norm_(CLIP)
        self.opt.step()
        self.opt.zero_grad()
        return float(loss.detach())


class FabricLoop:
    def __init__(self, mode: str, model: torch.nn.Module, device: torch.device, seed: int) -> None:
        from lightning_fabric import Fabric

        accelerator = "cuda" if device.type == "cuda" else "cpu"
        if mode in BNB:
            from lightning_fabric.plugins import BitsandbytesPrecision

            ignore: set[str] = set()
            if mode in FROZEN:
                model = _lora(model, seed)
                ignore = {n for n, _ in model.named_modules() if ".lora_" in n}
            plugin = BitsandbytesPrecision(mode=mode, dtype=BNB[mode], ignore_modules=ignore)
            self.fabric = Fabric(accelerator=accelerator, devices=1, plugins=plugin)
            self.model = self.fabric.setup_module(model)
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.opt = self.fabric.setup_optimizers(_adamw(params))
        else:
            self.fabric = Fabric(accelerator=accelerator, devices=1, precision=mode)
            self.model, self.opt = self.fabric.setup(model, _adamw(model.parameters()))
        self.ran = str(getattr(self.fabric._precision, "precision", mode))

    def step(self, batch: torch.Tensor) -> float:
        loss = _common.lm_step(self.model, batch)
        self.fabric.backward(loss)
        self.fabric.clip_gradients(self.model, self.opt, max_norm=CLIP)
        self.opt.step()
        self.opt.zero_grad()
        return float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.common_args(parser)
    parser.add_argument("--modes", default=None,
                        help="comma-separated modes (default: the core modes, plus the "
                             "bitsandbytes ones when mixprec-bnb is installed)")
    args = parser.parse_args(argv)
    try:
        import lightning_fabric
    except ImportError:
        raise SystemExit("This benchmark needs Lightning Fabric: "
                         "pip install 'lightning-fabric>=2.6'") from None
    size = _common.size_of(args)
    device = torch.device(args.device)
    installed = mixprec.registry().modes()
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    else:
        modes = CORE + [m for m in BNB if m in installed]

    torch.manual_seed(args.seed)
    with torch.device(device):
        base = BenchGPT(size)
    steps: dict[str, _common.Step] = {}
    ran: dict[str, str] = {}
    for mode in modes:
        options = {"dtype": BNB[mode]} if mode in BNB else {}
        for side, build in (
            ("fabric", lambda m=mode: FabricLoop(m, copy.deepcopy(base), device, args.seed)),
            ("mixprec", lambda m=mode, o=options: MixprecLoop(m, copy.deepcopy(base),
                                                              args.seed, **o)),
        ):
            try:
                loop = build()
            except Exception as exc:  # reported in the table, the others go on
                steps[f"{mode}/{side}"] = _common.failing(exc)
                continue
            steps[f"{mode}/{side}"] = loop.step
            ran[f"{mode}/{side}"] = loop.ran
    data = _common.batches(size, args.warmup + args.steps * args.repeats, args.seed, device)
    timings = _common.time_interleaved(steps, data, warmup=args.warmup, timed=args.steps,
                                       repeats=args.repeats, device=device)

    rows, results = [], []
    for mode in modes:
        fab, mix = timings[f"{mode}/fabric"], timings[f"{mode}/mixprec"]
        fabric_ran = ran.get(f"{mode}/fabric", mode)
        comparable = fabric_ran == mode
        ratio = mix.median_ms / fab.median_ms if mix.median_ms and fab.median_ms else None
        nan = [i for i, x in enumerate(fab.losses) if x != x]
        remark = []
        if not comparable:
            remark.append(f"Fabric ran {fabric_ran} instead")
        if nan:
            remark.append(f"Fabric loss NaN from step {nan[0] + 1}")
        if fab.error:
            remark.append(f"Fabric: {fab.error}")
        if mix.error:
            remark.append(f"mixprec: {mix.error}")
        results.append({
            "mode": mode, "fabric_ran": fabric_ran, "comparable": comparable,
            "lora": mode in FROZEN, "ratio": ratio,
            "fabric": {"median_ms": fab.median_ms, "repeat_medians_ms": fab.repeat_medians,
                       "final_loss": fab.losses[-1] if fab.losses else None, "error": fab.error},
            "mixprec": {"median_ms": mix.median_ms, "repeat_medians_ms": mix.repeat_medians,
                        "final_loss": mix.losses[-1] if mix.losses else None, "error": mix.error},
        })
        meets = ("—" if ratio is None or not comparable
                 else ("yes" if ratio <= 1.0 else "**no**"))
        rows.append([mode + (" (LoRA)" if mode in FROZEN else ""),
                     _common.fmt(fab.median_ms), _common.fmt(mix.median_ms),
                     _common.fmt(ratio, 3), meets,
                     _common.fmt(fab.losses[-1] if fab.losses else None, 4),
                     _common.fmt(mix.losses[-1] if mix.losses else None, 4),
                     _common.short("; ".join(remark), 160)])
    table = _common.markdown_table(
        ["mode", "Fabric ms", "mixprec ms", "mixprec / Fabric", "≤ 1", "Fabric last loss",
         "mixprec last loss", "remarks"], rows)
    notes = [
        f"lightning-fabric {lightning_fabric.__version__}; ms: median step time over "
        f"{args.repeats} repeats x {args.steps} steps after {args.warmup} warm-up steps, "
        "implementations interleaved, order rotating each repeat.",
        "(LoRA): the quantized Linear weights are frozen on both sides; rank-8 peft adapters "
        "on qkv/proj/fc1/fc2 train (Fabric's BitsandbytesPrecision is told to leave them "
        "alone with ignore_modules).",
        "Fabric on a CPU turns 16-mixed into bf16-mixed (with a warning) and refuses "
        "BitsandbytesPrecision; its 16-true trains Adam in fp16, which goes non-finite.",
    ]
    _common.write_results("vs_fabric", args, {"size": vars(size), "results": results},
                          table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
