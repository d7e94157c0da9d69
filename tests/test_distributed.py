"""mixprec on torch.distributed, tested with real processes: two CPU ranks on gloo.

One launch spawns two ranks that run every scenario below in turn and save what
they saw; the tests compare it with the same training in this single process
on the same global batch. Each rank gets half of every batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
import mixprec.distributed as mpd

WORLD = 2
LAUNCH_TIMEOUT_S = 420.0  # both ranks, every scenario, on two shared CPU cores
COLLECTIVE_TIMEOUT_S = 90  # a rank stuck in a collective errors instead of hanging
VOCAB, DIM, BATCH, SEQ, STEPS = 32, 16, 8, 6, 3


# -- model, data and loop shared by the ranks and the single-process reference -------------


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.norm(self.fc1(x))))


class TinyLM(nn.Module):
    """Embedding, two residual MLP blocks, a head; ``buffer=True`` adds an fp32
    buffer to the activations (FSDP2 does not cast buffers)."""

    def __init__(self, buffer: bool = False, dim: int = DIM) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(2))
        self.head = nn.Linear(dim, VOCAB)
        self.register_buffer("offset", torch.linspace(-0.5, 0.5, dim) if buffer else None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        if self.offset is not None:
            h = h + self.offset
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def make_model(seed: int = 0, buffer: bool = False, dim: int = DIM) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(buffer, dim)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def run_steps(model: nn.Module, opt: Any, steps: int, *, start: int = 0, rank: int = 0,
              world: int = 1, accumulate: int = 1, ddp: Any = None,
              poison: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> list[float]:
    """Train on this rank's share of each global batch; micro-batches but the last
    run under ``ddp.no_sync()``. ``poison(step, loss)`` may replace the loss."""
    losses = []
    per = BATCH // world
    micro = per // accumulate
    for step in range(start, start + steps):
        tokens, targets = (t[rank * per:(rank + 1) * per] for t in global_batch(step))
        total = 0.0
        for i in range(accumulate):
            last = i == accumulate - 1
            with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
                logits = model(tokens[i * micro:(i + 1) * micro])
                loss = F.cross_entropy(logits.float().flatten(0, 1),
                                       targets[i * micro:(i + 1) * micro].flatten()) / accumulate
                if poison is not None:
                    loss = poison(step, loss)
                opt.backward(loss)
            total += float(loss.detach())
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def full_weights(model: nn.Module, opt: Any) -> dict[str, torch.Tensor]:
    state = mpd.get_state_dict(model, opt, full_state_dict=True)
    return {k: v.detach().clone() for k, v in state.get("model", {}).items()}


def single_process(mode: Any, options: dict[str, Any], *, steps: int = STEPS,
                   optimizer: str = "sgd", seed: int = 0, buffer: bool = False, dim: int = DIM,
                   ) -> tuple[nn.Module, Any]:
    model = make_model(seed, buffer, dim)
    model, opt = mixprec.wrap(model, _optimizer(model, optimizer), mode, **options)
    run_steps(model, opt, steps)
    return model, opt


def _optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2)
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


# -- what each rank runs ---------------------------------------------------------------------


def ddp_train(rank: int, world: int, tmp: Path, mode: str, options: dict[str, Any],
              accumulate: int = 1, optimizer: str = "sgd", dim: int = DIM) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model(0, dim=dim)
    model, opt = mixprec.wrap(model, _optimizer(model, optimizer), mode, **options)
    ddp = DDP(model)
    losses = run_steps(ddp, opt, STEPS, rank=rank, world=world, accumulate=accumulate, ddp=ddp)
    return {"weights": full_weights(ddp, opt), "losses": losses,
            "scale": opt.precision.loss_scale, "skipped": opt.precision.skipped_steps}


def ddp_seeds(rank: int, world: int, tmp: Path, mode: str, options: dict[str, Any]) -> dict[str, Any]:
    """Each rank builds its model from its own seed (as nanoGPT does); DDP's initial
    broadcast makes the replicas equal, and the masters must follow it."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model(seed=rank)
    model, opt = mixprec.wrap(model, _optimizer(model, "adamw"), mode, **options)
    ddp = DDP(model)
    losses = run_steps(ddp, opt, STEPS, rank=rank, world=world, ddp=ddp)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"weights": weights, "losses": losses}


def fsdp_train(rank: int, world: int, tmp: Path, mode: str, options: dict[str, Any],
               autocast: bool = False) -> dict[str, Any]:
    model = make_model(0, buffer=autocast)
    mpd.fully_shard(model, mode, modules=model.blocks, autocast=autocast, **options)
    opt = _optimizer(model, "sgd")
    model, opt = mixprec.wrap(model, opt, mode, **options)
    seen: dict[str, str] = {}

    def look(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        seen.update(compute=str(module.weight.dtype), output=str(out.dtype))

    handle = model.blocks[0].fc1.register_forward_hook(look)
    losses = run_steps(model, opt, STEPS, rank=rank, world=world)
    handle.remove()
    stored = dict(model.named_parameters())["blocks.0.fc1.weight"]
    tokens, targets = global_batch(99)
    opt.backward(F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()))
    grad = stored.grad
    facts = {"stored": str(stored.dtype), "dtensor": type(stored).__name__,
             "local_rows": stored.to_local().shape[0], "grad": str(grad.dtype),
             "masters": opt.precision.masters is not None, **seen}
    opt.zero_grad()
    return {"weights": full_weights(model, opt), "losses": losses, "facts": facts,
            "scale": opt.precision.loss_scale, "summary": opt.precision.summary}


def overflow_ddp(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """Step 1 runs inside no_sync() (gradients stay per rank) and rank 1 overflows;
    step 2 is synchronised and rank 1 overflows again."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model(0)
    model, opt = mixprec.wrap(model, _optimizer(model, "sgd"), "16-mixed", init_scale=1024.0)
    ddp = DDP(model)

    def poison(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("inf") if rank == 1 and step in (1, 2) else loss

    scales, weights = [], []
    for step in range(3):
        with ddp.no_sync() if step == 1 else contextlib.nullcontext():
            run_steps(ddp, opt, 1, start=step, rank=rank, world=world, poison=poison)
        scales.append(opt.precision.loss_scale)
        weights.append(full_weights(ddp, opt))
    return {"scales": scales, "skipped": opt.precision.skipped_steps, "weights": weights}


def overflow_fsdp(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """An inf in one element of rank 1's gradient shard: only rank 1 can see it."""
    from mixprec._tensors import local_tensor

    model = make_model(0)
    mpd.fully_shard(model, "16-mixed", modules=model.blocks, init_scale=1024.0)
    opt = _optimizer(model, "sgd")
    model, opt = mixprec.wrap(model, opt, "16-mixed", init_scale=1024.0)
    scales, weights = [], []
    for step in range(2):
        tokens, targets = (t[rank * 4:(rank + 1) * 4] for t in global_batch(step))
        opt.backward(F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()))
        if step == 1 and rank == 1:
            local_tensor(dict(model.named_parameters())["head.weight"].grad)[0, 0] = float("inf")
        opt.step()
        opt.zero_grad()
        scales.append(opt.precision.loss_scale)
        weights.append(full_weights(model, opt))
    return {"scales": scales, "skipped": opt.precision.skipped_steps, "weights": weights,
            "last_nonfinite": opt.precision.last_nonfinite_param}


def checkpoint_fsdp(rank: int, world: int, tmp: Path, mode: str,
                    options: dict[str, Any]) -> dict[str, Any]:
    """Save after 2 steps (sharded with DCP, and full on rank 0), train 2 more; resume
    both checkpoints in fresh models on the same 2 ranks and train the same 2 steps."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    def fresh(seed: int) -> tuple[nn.Module, Any]:
        model = make_model(seed)
        mpd.fully_shard(model, mode, modules=model.blocks, **options)
        opt = _optimizer(model, "adamw")
        return mixprec.wrap(model, opt, mode, **options)

    model, opt = fresh(0)
    run_steps(model, opt, 2, rank=rank, world=world)
    dcp.save(mpd.get_state_dict(model, opt), checkpoint_id=tmp / "dcp")
    full = mpd.get_state_dict(model, opt, full_state_dict=True)
    if rank == 0:
        torch.save(full, tmp / "full.pt")
    else:
        assert full == {}, "only rank 0 receives the full state dict"
    dist.barrier()
    run_steps(model, opt, 2, start=2, rank=rank, world=world)
    out: dict[str, Any] = {"expected": full_weights(model, opt),
                           "expected_scale": opt.precision.loss_scale}

    model, opt = fresh(1)  # other initial weights: loading must overwrite them
    state = mpd.get_state_dict(model, opt)
    dcp.load(state, checkpoint_id=tmp / "dcp")
    mpd.set_state_dict(model, opt, state)
    run_steps(model, opt, 2, start=2, rank=rank, world=world)
    out.update(from_dcp=full_weights(model, opt), from_dcp_scale=opt.precision.loss_scale)

    model, opt = fresh(1)
    mpd.set_state_dict(model, opt, torch.load(tmp / "full.pt", weights_only=True),
                       full_state_dict=True)
    run_steps(model, opt, 2, start=2, rank=rank, world=world)
    out.update(from_full=full_weights(model, opt), from_full_scale=opt.precision.loss_scale,
               steps=opt.precision.steps,  # (state dicts alias live tensors, as torch's do)
               full=torch.load(tmp / "full.pt", weights_only=True) if rank == 0 else {})

    model, opt = fresh(1)  # the full checkpoint read on rank 0 only, broadcast to the others
    mpd.set_state_dict(model, opt, torch.load(tmp / "full.pt", weights_only=True) if rank == 0
                       else {}, full_state_dict=True, broadcast_from_rank0=True)
    run_steps(model, opt, 2, start=2, rank=rank, world=world)
    out.update(from_broadcast=full_weights(model, opt),
               from_broadcast_scale=opt.precision.loss_scale)
    return out


def checkpoint_ddp(rank: int, world: int, tmp: Path, mode: str,
                   options: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    def fresh(seed: int) -> tuple[nn.Module, Any]:
        model = make_model(seed)
        model, opt = mixprec.wrap(model, _optimizer(model, "adamw"), mode, **options)
        return DDP(model), opt

    model, opt = fresh(0)
    run_steps(model, opt, 2, rank=rank, world=world, ddp=model)
    if rank == 0:
        torch.save(mpd.get_state_dict(model, opt, full_state_dict=True), tmp / "ddp.pt")
    dist.barrier()
    run_steps(model, opt, 2, start=2, rank=rank, world=world, ddp=model)
    expected = full_weights(model, opt)
    model, opt = fresh(1)
    mpd.set_state_dict(model, opt, torch.load(tmp / "ddp.pt", weights_only=True),
                       full_state_dict=True)
    full = torch.load(tmp / "ddp.pt", weights_only=True)
    run_steps(model, opt, 2, start=2, rank=rank, world=world, ddp=model)
    return {"expected": expected, "resumed": full_weights(model, opt), "full": full}


class BothOptimizers:
    """Two optimizers wrapped with one model (the body, the head), driven by
    :func:`run_steps` as one: backward through the first, then each steps. From
    ``poison_step`` the head's gradient holds inf on ``poison_rank`` (before DDP
    reduces it: every rank sees it), so only the head's step is skipped."""

    def __init__(self, model: nn.Module, mode: str, options: dict[str, Any],
                 poison_rank: int | None = None, poison_step: int = 1) -> None:
        body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
        pair = [torch.optim.SGD(body, lr=0.2, momentum=0.9),
                torch.optim.SGD(model.head.parameters(), lr=0.2, momentum=0.9)]
        self.model, self.opts = mixprec.wrap(model, pair, mode, **options)
        self.steps = 0
        def poison(grad: torch.Tensor) -> torch.Tensor:
            here = poison_rank == -1 or poison_rank == torch.distributed.get_rank()
            return grad * float("inf") if self.steps == poison_step and here else grad

        if poison_rank is not None:  # -1: in this process (no process group)
            model.head.weight.register_hook(poison)

    def backward(self, loss: torch.Tensor) -> None:
        self.opts[0].backward(loss)

    def step(self) -> None:
        for opt in self.opts:
            opt.step()
        self.steps += 1

    def zero_grad(self) -> None:
        for opt in self.opts:
            opt.zero_grad()


def ddp_several(rank: int, world: int, tmp: Path, mode: str, options: dict[str, Any]) -> dict[str, Any]:
    """Two optimizers under DDP, two micro-batches per step (the first under no_sync()),
    the head's gradient inf at step 1; save after 2 steps, train 2 more, resume the
    checkpoint in a fresh model and train the same 2 steps."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    def fresh(seed: int) -> tuple[nn.Module, BothOptimizers]:
        both = BothOptimizers(make_model(seed), mode, options, poison_rank=1)
        return DDP(both.model), both

    ddp, both = fresh(0)
    run_steps(ddp, both, 2, rank=rank, world=world, accumulate=2, ddp=ddp)
    if rank == 0:
        torch.save(mpd.get_state_dict(ddp, both.opts[1], full_state_dict=True), tmp / "ckpt.pt")
    dist.barrier()
    losses = run_steps(ddp, both, 2, start=2, rank=rank, world=world, accumulate=2, ddp=ddp)
    out = {"weights": full_weights(ddp, both.opts[0]), "losses": losses,
           "scale": both.model.precision.loss_scale,
           "skipped": [opt.precision.skipped_steps for opt in both.opts]}
    ddp, both = fresh(1)
    both.steps = 2  # the poisoned step is behind
    mpd.set_state_dict(ddp, both.opts[0], torch.load(tmp / "ckpt.pt", weights_only=True),
                       full_state_dict=True)
    run_steps(ddp, both, 2, start=2, rank=rank, world=world, accumulate=2, ddp=ddp)
    out["resumed"] = full_weights(ddp, both.opts[0])
    return out


class NoFsdpMode(mixprec.PrecisionMode):
    """A third-party mode that does not declare FSDP2 support."""

    name = "third-party"


class NoFsdpOptimizer(mixprec.OptimizerMode):
    name = "third-party-optim"


def refusals(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """Each wrong combination: the error's class and message, and that nothing changed."""
    from torch.distributed.fsdp import fully_shard as torch_fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    def attempt(fn: Callable[[], Any]) -> tuple[str, str]:
        try:
            fn()
        except mixprec.MixprecError as exc:
            return type(exc).__name__, str(exc)
        return "no error", ""

    out: dict[str, Any] = {}
    model = make_model(0)
    out["wrap_ddp"] = attempt(lambda: mixprec.wrap(DDP(model), _optimizer(model, "sgd"), "16-mixed"))
    sharded = make_model(0)
    torch_fully_shard(sharded)
    out["torch_sharded"] = attempt(lambda: mixprec.wrap(sharded, _optimizer(sharded, "sgd"),
                                                        "bf16-mixed"))
    plain = make_model(0)
    before = {n: (p, p.dtype) for n, p in plain.named_parameters()}
    out["mp_policy"] = attempt(lambda: mpd.fully_shard(plain, "16-true",
                                                      fsdp_kwargs={"mp_policy": None}))
    out["root_unit"] = attempt(lambda: mpd.fully_shard(plain, "32-true", modules=[plain]))
    out["third_party"] = attempt(lambda: mpd.fully_shard(plain, NoFsdpMode()))
    out["third_party_optim"] = attempt(lambda: mpd.fully_shard(plain, ["bf16-mixed",
                                                                        NoFsdpOptimizer()]))
    out["untouched"] = all(type(p) is nn.Parameter and p is before[n][0] and p.dtype is before[n][1]
                           for n, p in plain.named_parameters())
    mpd.fully_shard(plain, "bf16-mixed")
    out["other_mode"] = attempt(lambda: mixprec.wrap(plain, _optimizer(plain, "sgd"), "16-mixed"))
    out["fsdp_several"] = attempt(lambda: mixprec.wrap(
        plain, [_optimizer(plain.blocks, "sgd"), _optimizer(plain.head, "sgd")], "bf16-mixed"))
    ddp_model, ddp_opt = mixprec.wrap(make_model(0), None, "32-true"), None
    out["ddp_sharded_ckpt"] = attempt(lambda: mpd.get_state_dict(DDP(ddp_model), ddp_opt))
    return out


def fp8_fsdp(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """torchao FP8 layers (mixprec-torchao's mode, real torchao) on FSDP2."""
    model = make_model(0)
    mode = _fp8_mode()
    mpd.fully_shard(model, mode, modules=model.blocks)
    opt = _optimizer(model, "sgd")
    model, opt = mixprec.wrap(model, opt, mode)
    losses = run_steps(model, opt, 2, rank=rank, world=world)
    kinds = sorted({type(m).__name__ for m in model.modules() if "Float8" in type(m).__name__})
    return {"weights": full_weights(model, opt), "losses": losses, "kinds": kinds}


def _fp8_mode() -> mixprec.PrecisionMode:
    """mixprec-torchao's fp8-tensorwise with an FSDP plan, if the plugin has none yet."""
    from mixprec_torchao._fp8 import Float8Training

    class Fp8OnFsdp(Float8Training):
        def fsdp_plan(self) -> mpd.FSDPPlan:
            return mpd.FSDPPlan(convert_module=True, forward_context=True)

    mode = Float8Training("tensorwise")
    return mode if hasattr(mode, "fsdp_plan") else Fp8OnFsdp("tensorwise")


def low_bit_adamw_fsdp(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """torchao's AdamW8bit (mixprec-torchao's ao-adamw8bit) stepping FSDP2 shards."""
    model = make_model(0, dim=64)  # 8192-element weights: torchao quantizes state from 4096
    mpd.fully_shard(model, "32-true", modules=model.blocks)
    model, opt = mixprec.wrap(model, _optimizer(model, "adamw"), ["32-true", _ao_adamw8bit()])
    losses = run_steps(model, opt, STEPS, rank=rank, world=world)
    state = [sorted(f"{k}:{type(v).__name__}/{type(getattr(v, '_local_tensor', v)).__name__}"
                    for k, v in s.items()) for p, s in opt.optimizer.state.items() if p.numel() >= 4096]
    return {"weights": full_weights(model, opt), "losses": losses, "state": state}


def _ao_adamw8bit() -> mixprec.OptimizerMode:
    """mixprec-torchao's ao-adamw8bit, declared FSDP2-compatible if the plugin does not yet."""
    from mixprec_torchao._optim import LowBitAdamW

    class OnFsdp(LowBitAdamW):
        fsdp_compatible = True

    mode = LowBitAdamW("8bit")
    return mode if getattr(mode, "fsdp_compatible", False) else OnFsdp("8bit")


def plugin_refusals(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    out = {}
    for mode in ("nf4", "32-true+adamw8bit", "transformer-engine"):
        try:
            mpd.fully_shard(make_model(0), mode)
        except mixprec.MixprecError as exc:
            out[mode] = (type(exc).__name__, str(exc))
    return out


# -- the launch ----------------------------------------------------------------------------------


def _worker(rank: int, world: int, root: str, scenarios: list[tuple[str, str, dict[str, Any]]]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        for name, function, kwargs in scenarios:
            tmp = Path(root) / name
            tmp.mkdir(exist_ok=True)
            try:
                result = globals()[function](rank, world, tmp, **kwargs)
            except Exception:
                result = {"error": traceback.format_exc()}
            torch.save(result, Path(root) / f"{name}.rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every result is on disk. Skip interpreter finalisation: gloo worker threads still
    # holding finished work can abort it with SIGABRT ("terminate called without an
    # active exception"; pytorch/pytorch#179291); seen on this loaded 2-core machine.
    sys.stdout.flush()
    os._exit(0)


DDP_MODES = [("32-true", {}), ("64-true", {}), ("bf16-mixed", {}), ("16-mixed", {}),
             ("bf16-true", {}), ("16-true", {}), ("bf16-true", {"master_weights": True})]
FSDP_MODES = [("32-true", {}, False), ("64-true", {}, False), ("bf16-mixed", {}, False),
              ("bf16-mixed", {}, True),
              ("16-mixed", {}, False), ("bf16-true", {}, False), ("16-true", {}, False),
              ("bf16-true", {"master_weights": True}, False),
              ("16-true", {"master_weights": True}, False)]


#: modes that keep copies of the weights (fp32 masters, 16-true's fp32 step copies)
SEEDED_MODES = [("bf16-true", {"master_weights": True}), ("16-true", {"master_weights": True}),
                ("16-true", {})]


def _key(*parts: Any) -> str:
    return "-".join(str(p).replace("_", "").replace(" ", "") for p in parts if p not in ({}, False))


def _importable(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


HAVE_AO = _importable("mixprec_torchao", "torchao")
HAVE_BNB = _importable("mixprec_bnb", "bitsandbytes")
HAVE_TE_PLUGIN = _importable("mixprec_te")
# (mode, optimizer): bitsandbytes 4-bit frozen base, int8 matmuls, 8-bit optimizers on DDP
PLUGIN_DDP = ([("nf4", "adamw"), ("int8-training", "sgd"), ("32-true+adamw8bit", "adamw")]
              if HAVE_BNB else []) + ([("32-true+ao-adamw8bit", "adamw"), ("fp8-tensorwise", "sgd")]
                                      if HAVE_AO else [])


def _scenarios() -> list[tuple[str, str, dict[str, Any]]]:
    out = [(_key("ddp", m, o), "ddp_train", {"mode": m, "options": o}) for m, o in DDP_MODES]
    out += [(_key("ddp-acc", m, o), "ddp_train", {"mode": m, "options": o, "accumulate": 2})
            for m, o in [("16-mixed", {}), ("bf16-true", {"master_weights": True})]]
    out += [(_key("fsdp", m, o, "autocast" if a else False), "fsdp_train",
             {"mode": m, "options": o, "autocast": a}) for m, o, a in FSDP_MODES]
    out += [("overflow-ddp", "overflow_ddp", {}), ("overflow-fsdp", "overflow_fsdp", {}),
            ("ckpt-fsdp", "checkpoint_fsdp",
             {"mode": "16-mixed", "options": {"init_scale": 256.0, "growth_interval": 3}}),
            ("ckpt-fsdp-master", "checkpoint_fsdp",
             {"mode": "bf16-true", "options": {"master_weights": True}}),
            ("ckpt-ddp", "checkpoint_ddp",
             {"mode": "bf16-true", "options": {"master_weights": True}}),
            *((_key("ddp-several", m, o), "ddp_several", {"mode": m, "options": o})
              for m, o in SEVERAL_MODES),
            ("refusals", "refusals", {})]
    out += [(_key("ddp-seeds", m, o), "ddp_seeds", {"mode": m, "options": o})
            for m, o in SEEDED_MODES]
    out += [(_key("ddp-plugin", m), "ddp_train", {"mode": m, "options": {}, "optimizer": o,
                                                   "dim": 64}) for m, o in PLUGIN_DDP]
    if HAVE_AO:
        out += [("fp8-fsdp", "fp8_fsdp", {}), ("ao-adamw-fsdp", "low_bit_adamw_fsdp", {})]
    if HAVE_AO and HAVE_BNB and HAVE_TE_PLUGIN:
        out.append(("plugin-refusals", "plugin_refusals", {}))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Launch two ranks once for every scenario; skip only if processes cannot start."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available here")
    root = tmp_path_factory.mktemp("ranks")
    scenarios = _scenarios()
    try:
        context = mp.start_processes(_worker, args=(WORLD, str(root), scenarios), nprocs=WORLD,
                                     join=False, start_method="spawn")
    except (OSError, RuntimeError) as exc:  # no fork/spawn, no shared memory, sandboxes
        pytest.skip(f"this platform cannot start processes: {exc}")
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {LAUNCH_TIMEOUT_S:.0f} s")
    results: dict[str, list[dict[str, Any]]] = {}
    for name, _, _ in scenarios:
        results[name] = [torch.load(root / f"{name}.rank{r}.pt", weights_only=True)
                         for r in range(WORLD)]
    return results


def result(runs: dict[str, list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    ranks = runs[name]
    for r, got in enumerate(ranks):
        if "error" in got:
            pytest.fail(f"rank {r} failed in scenario {name}:\n{got['error']}")
    return ranks


def assert_weights_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                         start: dict[str, torch.Tensor], atol: float) -> None:
    """Equal within ``atol`` -- and training moved the weights ten times more than that."""
    assert got.keys() == want.keys()
    moved = max(float((want[k].float() - start[k].float()).abs().max()) for k in want)
    assert moved > 10 * atol, f"training moved the weights only {moved:.2e}"
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=0, atol=atol, msg=k)


def _detached(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _tol(mode: str, options: dict[str, Any]) -> float:
    """Distributed vs single process: fp32 reduction order, then rounding to the dtype
    the weights or the gradients live in (measured: 1e-7, 5e-5, 3e-4, 1e-3)."""
    if mode in ("32-true", "64-true"):
        return 2e-6
    if mode == "16-mixed" or (mode == "16-true" and options.get("master_weights")):
        return 3e-4
    return 4e-3 if mode == "bf16-true" and not options else 2e-3


ACC_MODES = [("16-mixed", {}), ("bf16-true", {"master_weights": True})]
#: two optimizers under DDP (init_scale: no overflow but the one the test makes)
SEVERAL_MODES = [("16-mixed", {"init_scale": 1024.0}), ("bf16-true", {"master_weights": True})]


@pytest.mark.parametrize(("mode", "options"), DDP_MODES, ids=[_key(m, o) for m, o in DDP_MODES])
def test_ddp_training_matches_a_single_process_on_the_same_global_batch(runs, mode, options):
    rank0, rank1 = result(runs, _key("ddp", mode, options))
    model, opt = single_process(mode, options)
    assert_weights_close(rank0["weights"], _detached(model.state_dict()),
                         make_model(0).state_dict(), _tol(mode, options))
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), f"replicas differ in {name}"
    assert rank0["scale"] == rank1["scale"] == opt.precision.loss_scale
    reference = run_steps(*single_process(mode, options, steps=0), STEPS)
    halves = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"])]
    assert halves == pytest.approx(reference, rel=1e-5 if mode in ("32-true", "64-true") else 2e-2)


@pytest.mark.parametrize(("mode", "options"), ACC_MODES, ids=[_key(m, o) for m, o in ACC_MODES])
def test_ddp_no_sync_accumulation_matches_a_single_process(runs, mode, options):
    """Two micro-batches per rank, the first under no_sync(); with master weights
    its gradients must wait on the model for DDP's all-reduce."""
    rank0, rank1 = result(runs, _key("ddp-acc", mode, options))
    model, _ = single_process(mode, options)
    assert_weights_close(rank0["weights"], _detached(model.state_dict()),
                         make_model(0).state_dict(), _tol(mode, options))
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), f"replicas differ in {name}"


@pytest.mark.parametrize(("mode", "options"), SEVERAL_MODES,
                         ids=[_key(m, o) for m, o in SEVERAL_MODES])
def test_ddp_with_two_optimizers_matches_a_single_process_and_resumes_exactly(runs, mode, options):
    """Each rank skips the same steps of the same optimizer (the head's, whose reduced
    gradient holds inf at step 1), the shared scale backs off once, no_sync()
    micro-batches wait on the model for DDP; a checkpoint of both resumes bit-identically."""
    rank0, rank1 = result(runs, _key("ddp-several", mode, options))
    both = BothOptimizers(make_model(0), mode, options, poison_rank=-1)
    run_steps(both.model, both, 4)
    assert_weights_close(rank0["weights"], _detached(both.model.state_dict()),
                         make_model(0).state_dict(), _tol(mode, options))
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), f"replicas differ in {name}"
        assert torch.equal(rank0["resumed"][name], value), f"resume differs in {name}"
        assert torch.equal(rank1["resumed"][name], value), f"resume differs in {name}"
    assert rank0["skipped"] == rank1["skipped"] == [0, 1]
    assert [opt.precision.skipped_steps for opt in both.opts] == [0, 1]
    assert rank0["scale"] == rank1["scale"] == both.model.precision.loss_scale
    if mode == "16-mixed":
        assert rank0["scale"] == 512.0  # backed off once


@pytest.mark.parametrize(("mode", "options", "autocast"), FSDP_MODES,
                         ids=[_key(m, o, "autocast" if a else False) for m, o, a in FSDP_MODES])
def test_fsdp_training_matches_a_single_process_on_the_same_global_batch(
        runs, mode, options, autocast):
    rank0, rank1 = result(runs, _key("fsdp", mode, options, "autocast" if autocast else False))
    model, opt = single_process(mode, options, buffer=autocast)
    assert_weights_close(rank0["weights"], _detached(model.state_dict()),
                         make_model(0, buffer=autocast).state_dict(), _tol(mode, options))
    assert rank1["weights"] == {}, "the full state dict goes to rank 0 only"
    assert rank0["scale"] == rank1["scale"] == opt.precision.loss_scale


# (stored = sharded parameter, compute = all-gathered weight in the forward, grad)
FSDP_DTYPES = {
    "fsdp-32-true": ("float32", "float32", "float32"),
    "fsdp-64-true": ("float64", "float64", "float64"),
    "fsdp-bf16-mixed": ("float32", "bfloat16", "float32"),
    "fsdp-bf16-mixed-autocast": ("float32", "bfloat16", "float32"),
    "fsdp-16-mixed": ("float32", "float16", "float32"),
    "fsdp-bf16-true": ("bfloat16", "bfloat16", "bfloat16"),
    "fsdp-16-true": ("float16", "float16", "float16"),
    "fsdp-bf16-true-{'masterweights':True}": ("float32", "bfloat16", "float32"),
    "fsdp-16-true-{'masterweights':True}": ("float32", "float16", "float32"),
}


@pytest.mark.parametrize("name", sorted(FSDP_DTYPES))
def test_fsdp_runs_modes_through_the_mixed_precision_policy(runs, name):
    """Mixed modes and master weights: fp32 shards, FSDP2 casts for compute and
    reduces in fp32; no mixprec masters (the shards are the masters)."""
    for got in result(runs, name):
        facts = got["facts"]
        stored, compute, grad = FSDP_DTYPES[name]
        assert (facts["stored"], facts["compute"], facts["grad"]) == (
            f"torch.{stored}", f"torch.{compute}", f"torch.{grad}")
        assert facts["dtensor"] == "DTensor" and facts["local_rows"] == 2 * DIM // WORLD
        assert facts["masters"] is False
        assert ("no autocast" in got["summary"]) == ("mixed" in name and "autocast" not in name)


@pytest.mark.parametrize(("mode", "options"), SEEDED_MODES,
                         ids=[_key(m, o) for m, o in SEEDED_MODES])
def test_ranks_seeded_differently_stay_bit_equal_after_ddp_broadcasts_rank_0(runs, mode, options):
    """DDP overwrites rank 1's parameters with rank 0's at construction; copies kept by
    the mode (fp32 masters) must take that write, or the ranks silently diverge."""
    a, b = result(runs, _key("ddp-seeds", mode, options))
    assert a["weights"].keys() == b["weights"].keys()
    for name, value in a["weights"].items():
        assert torch.equal(value, b["weights"][name]), name


def test_ddp_overflow_on_one_rank_inside_no_sync_skips_the_step_on_every_rank(runs):
    rank0, rank1 = result(runs, "overflow-ddp")
    for got in (rank0, rank1):
        assert got["scales"] == [1024.0, 512.0, 256.0]
        assert got["skipped"] == 2
        first = got["weights"][0]
        for later in got["weights"][1:]:
            assert all(torch.equal(later[k], first[k]) for k in first), "a skipped step changed weights"
    assert all(torch.equal(rank0["weights"][0][k], rank1["weights"][0][k]) for k in rank0["weights"][0])


def test_fsdp_overflow_in_one_ranks_gradient_shard_skips_the_step_on_every_rank(runs):
    rank0, rank1 = result(runs, "overflow-fsdp")
    assert rank0["scales"] == rank1["scales"] == [1024.0, 512.0]
    assert rank0["skipped"] == rank1["skipped"] == 1
    before, after = rank0["weights"]
    assert all(torch.equal(before[k], after[k]) for k in before), "a rank stepped its shard"
    assert rank1["last_nonfinite"] == "head.weight"
    assert rank0["last_nonfinite"] is None  # rank 0's own shards were finite: the flag came from rank 1


@pytest.mark.parametrize("name", ["ckpt-fsdp", "ckpt-fsdp-master"])
def test_fsdp_checkpoints_resume_bit_identically_on_two_ranks(runs, name):
    rank0, _ = result(runs, name)
    expected = rank0["expected"]
    for resumed in ("from_dcp", "from_full", "from_broadcast"):
        got = rank0[resumed]
        assert got.keys() == expected.keys()
        for k, value in expected.items():
            assert got[k].dtype == value.dtype and torch.equal(got[k], value), (resumed, k)
        assert rank0[f"{resumed}_scale"] == rank0["expected_scale"]
    assert rank0["steps"] == 4


@pytest.mark.parametrize(("name", "mode", "options"), [
    ("ckpt-fsdp", "16-mixed", {"init_scale": 256.0, "growth_interval": 3}),
    ("ckpt-fsdp-master", "bf16-true", {"master_weights": True}),
    ("ckpt-ddp", "bf16-true", {"master_weights": True}),
])
def test_a_two_rank_checkpoint_loads_into_a_single_process_model(runs, name, mode, options):
    rank0, _ = result(runs, name)
    full = rank0["full"]
    model = make_model(1)
    model, opt = mixprec.wrap(model, _optimizer(model, "adamw"), mode, **options)
    opt.precision.load_state_dict(full)
    loaded = model.state_dict()
    assert loaded.keys() == full["model"].keys()
    for k, value in full["model"].items():
        assert torch.equal(loaded[k], value), k
    assert opt.precision.steps == 2
    state = opt.state_dict()["state"]
    assert state.keys() == full["optimizer"]["state"].keys()
    for index, entries in full["optimizer"]["state"].items():
        for key, value in entries.items():
            assert torch.equal(state[index][key], value), (index, key)
    assert opt.precision.loss_scale == full["optimizer"]["mixprec"]["scaler"]["scale"] if (
        full["optimizer"]["mixprec"]["scaler"]) else opt.precision.loss_scale is None
    run_steps(model, opt, 2, start=2)  # and it trains on like the two ranks did; AdamW's
    expected = rank0["expected"]      # normalised step magnifies reduction-order noise
    moved = max(float((expected[k].float() - full["model"][k].float()).abs().max()) for k in expected)
    for k, value in model.state_dict().items():
        torch.testing.assert_close(value.float(), expected[k].float(), rtol=0, atol=moved / 3)


def test_ddp_checkpoint_resumes_bit_identically_on_two_ranks(runs):
    for got in result(runs, "ckpt-ddp"):
        for k, value in got["expected"].items():
            assert torch.equal(got["resumed"][k], value), k


def test_wrong_orders_and_unsupported_combinations_are_refused_clearly(runs):
    for got in result(runs, "refusals"):
        assert got["wrap_ddp"][0] == "WrapError"
        assert "wrap the plain model first" in got["wrap_ddp"][1]
        assert got["torch_sharded"][0] == "WrapError"
        assert "mixprec.distributed.fully_shard(model" in got["torch_sharded"][1]
        assert got["mp_policy"][0] == "ModeOptionError" and "mp_policy" in got["mp_policy"][1]
        assert got["root_unit"][0] == "WrapError" and "modules=model.blocks" in got["root_unit"][1]
        assert got["third_party"][0] == "WrapError"
        assert "'third-party'" in got["third_party"][1] and "FSDP2" in got["third_party"][1]
        assert got["third_party_optim"][0] == "WrapError"
        assert "'third-party-optim'" in got["third_party_optim"][1]
        assert got["untouched"] is True, "a refused fully_shard changed the model"
        assert got["other_mode"][0] == "WrapError"
        assert "'bf16-mixed'" in got["other_mode"][1] and "'16-mixed'" in got["other_mode"][1]
        assert got["ddp_sharded_ckpt"][0] == "CheckpointError"
        assert got["fsdp_several"][0] == "WrapError" and "FSDP2" in got["fsdp_several"][1]


@pytest.mark.skipif(not HAVE_AO, reason="mixprec-torchao is not installed")
def test_torchao_fp8_trains_on_fsdp2_like_a_single_process(runs):
    """Within FP8 noise: each rank scales its own half-batch activations (tensorwise
    amax), so the runs differ by FP8 rounding (measured 2.4e-3; FP8 vs bf16-mixed in one
    process differ by 2.7e-3)."""
    rank0, rank1 = result(runs, "fp8-fsdp")
    assert rank0["kinds"] == ["Float8Linear"]
    model = make_model(0)
    model, opt = mixprec.wrap(model, _optimizer(model, "sgd"), _fp8_mode())
    losses = run_steps(model, opt, 2)
    assert_weights_close(rank0["weights"], _detached(model.state_dict()),
                         make_model(0).state_dict(), atol=4e-3)
    halves = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"])]
    assert halves == pytest.approx(losses, rel=5e-3)


@pytest.mark.parametrize(("mode", "optimizer"), PLUGIN_DDP, ids=[m for m, _ in PLUGIN_DDP])
def test_plugin_modes_train_under_ddp_like_a_single_process(runs, mode, optimizer):
    """Measured: nf4 2e-4, 32-true+adamw8bit and ao-adamw8bit 5e-5, int8 matmuls (SGD) 2e-3;
    FP8 scales each rank's half-batch activations itself (tensorwise amax)."""
    rank0, rank1 = result(runs, _key("ddp-plugin", mode))
    with warnings.catch_warnings():  # the plugins' own conversion notes are not under test here
        warnings.simplefilter("ignore", mixprec.MixprecWarning)
        model, _ = single_process(mode, {}, optimizer=optimizer, dim=64)
    want = _detached(model.state_dict())
    start = make_model(0, dim=64).state_dict()
    trained = {k: v for k, v in want.items()  # not nf4's packed bytes and quantization state
               if k in start and start[k].shape == v.shape}
    assert_weights_close({k: rank0["weights"][k] for k in trained}, trained, start,
                         atol=5e-3 if mode in ("int8-training", "fp8-tensorwise") else 2e-3)
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), f"replicas differ in {name}"


@pytest.mark.skipif(not HAVE_AO, reason="mixprec-torchao is not installed")
def test_torchao_low_bit_adamw_steps_fsdp2_shards(runs):
    rank0, rank1 = result(runs, "ao-adamw-fsdp")
    for got in (rank0, rank1):
        assert got["state"] and all(s == ["exp_avg:DTensor/OptimState8bit",
                                          "exp_avg_sq:DTensor/OptimState8bit",
                                          "step:Tensor/Tensor"] for s in got["state"])
    model, _ = single_process(["32-true", _ao_adamw8bit()], {}, optimizer="adamw", dim=64)
    assert_weights_close(rank0["weights"], _detached(model.state_dict()),
                         make_model(0, dim=64).state_dict(), atol=5e-4)


@pytest.mark.skipif(not (HAVE_AO and HAVE_BNB and HAVE_TE_PLUGIN),
                    reason="needs mixprec-bnb, mixprec-torchao and mixprec-te")
def test_plugin_modes_without_fsdp2_support_are_refused_by_name(runs):
    got = result(runs, "plugin-refusals")[0]
    for mode, name, dist in [("nf4", "'nf4'", "mixprec-bnb"),
                             ("32-true+adamw8bit", "'adamw8bit'", "mixprec-bnb"),
                             ("transformer-engine", "'transformer-engine'", "mixprec-te")]:
        kind, message = got[mode]
        assert kind == "WrapError" and name in message and dist in message, message
        assert "FSDP2" in message and "DistributedDataParallel" in message


def test_the_torchrun_example_trains_saves_and_resumes_with_fsdp2(tmp_path):
    """examples/train_distributed.py under real torchrun (env:// rendezvous on localhost)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "examples" / "train_distributed.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={WORLD}", str(script), "--engine", "fsdp", "--mode",
               "bf16-true", "--option", "master_weights=true", "--size", "tiny,batch=4",
               "--accumulate", "2"]
    outputs = []
    for extra in (["--steps", "2", "--save", str(tmp_path / "ckpt")],
                  ["--steps", "1", "--resume", str(tmp_path / "ckpt")]):
        try:
            done = subprocess.run(command + extra, capture_output=True, text=True,
                                  timeout=LAUNCH_TIMEOUT_S / 2,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "MIXPREC_LOAD_PLUGINS": ""})
        except OSError as exc:
            pytest.skip(f"this platform cannot start processes: {exc}")
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout)
    assert "sharded with FSDP2 MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)" \
        in outputs[0]
    assert f"saved {tmp_path / 'ckpt'} after step 1" in outputs[0]
    assert "step    2  loss" in outputs[1]  # resumed at step 2
