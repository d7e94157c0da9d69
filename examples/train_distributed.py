"""Train the bench GPT with mixprec under DDP or FSDP2, in any mode, with torchrun.

    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --engine ddp --mode bf16-mixed
    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --engine fsdp \\
        --mode bf16-true --option master_weights=true --save ckpt --steps 100
    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --engine fsdp \\
        --mode bf16-true --option master_weights=true --resume ckpt --steps 100

The order that works:

* DDP: ``model, opt = mixprec.wrap(model, opt, mode)``, then
  ``DistributedDataParallel(model)``; micro-batches but the last run under
  ``model.no_sync()``.
* FSDP2: ``mixprec.distributed.fully_shard(model, mode, modules=model.blocks)``
  (converts, then shards with the mode's ``MixedPrecisionPolicy``), build the
  optimizer, then ``mixprec.wrap(model, opt, mode)``; micro-batches but the last
  run with ``model.set_requires_gradient_sync(False)``.

Checkpoints: FSDP2 saves sharded through ``torch.distributed.checkpoint`` (every
rank writes its shards); DDP saves the single-process format on rank 0. Each rank
gets ``batch / world`` sequences of every global batch. CPU ranks use gloo, GPU
ranks NCCL with one GPU each.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import mixprec
import mixprec.distributed as mpd
from mixprec._bench.model import BenchGPT, MarkovTask, lm_loss, parse_size


def _options(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--option takes key=value, got {pair!r}")
        text = {"true": "True", "false": "False", "none": "None"}.get(value.lower(), value)
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--mode", default="bf16-mixed", help="any mixprec mode string")
    parser.add_argument("--option", action="append", default=[],
                        help="a mode option, key=value (repeatable): master_weights=true")
    parser.add_argument("--size", default="small", help="bench model size (tiny, small, …)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, help="checkpoint folder written after the last step")
    parser.add_argument("--resume", type=Path, help="checkpoint folder to resume from")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("Run this under torchrun: torchrun --standalone --nproc-per-node 2 "
                         "examples/train_distributed.py ...")

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    size = parse_size(args.size)
    if size.batch % (world * args.accumulate):
        raise SystemExit(f"batch {size.batch} does not split into {world} ranks x "
                         f"{args.accumulate} micro-batches; change --size batch=… or --accumulate.")
    options = _options(args.option)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = BenchGPT(size).to(device)
    if args.engine == "fsdp":
        mpd.fully_shard(model, args.mode, modules=model.blocks, **options)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    model, opt = mixprec.wrap(model, opt, args.mode, **options)
    net: torch.nn.Module = model
    if args.engine == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local] if cuda else None)

    start = 0
    if args.resume is not None:
        start = _load(args.resume, args.engine, net, opt)
    if rank == 0:
        print(f"{world} ranks ({args.engine}, {device.type}), {size.describe()}\n"
              f"{opt.precision.summary}", flush=True)

    task = MarkovTask(size.vocab, args.seed)
    data = task.batches(start + args.steps, size.batch, size.seq, args.seed + 1)
    per = size.batch // world
    micro = per // args.accumulate
    began = time.perf_counter()
    for step in range(start, start + args.steps):
        mine = data[step, rank * per:(rank + 1) * per].to(device)
        total = torch.zeros((), device=device)
        for i in range(args.accumulate):
            chunk = mine[i * micro:(i + 1) * micro]
            with _no_sync(net, args.engine, last=i == args.accumulate - 1):
                loss = lm_loss(net(chunk[:, :-1]), chunk[:, 1:]) / args.accumulate
                opt.backward(loss)
            total += loss.detach()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == start + args.steps - 1:
            dist.all_reduce(total)
            if rank == 0:
                scale = opt.precision.loss_scale
                print(f"step {step:4d}  loss {float(total) / world:.4f}  "
                      f"(floor {task.floor(data[step]):.4f})"
                      + ("" if scale is None else f"  scale {scale:g}")
                      + f"  skipped {opt.precision.skipped_steps}", flush=True)
    if rank == 0:
        print(f"{args.steps} steps in {time.perf_counter() - began:.1f} s", flush=True)
    if args.save is not None:
        _save(args.save, args.engine, net, opt, rank)
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


def _no_sync(net: torch.nn.Module, engine: str, *, last: bool) -> Any:
    if engine == "ddp":
        return contextlib.nullcontext() if last else net.no_sync()  # type: ignore[operator]
    net.set_requires_gradient_sync(last)  # FSDP2: reduce-scatter only on the last micro-batch
    return contextlib.nullcontext()


def _save(folder: Path, engine: str, net: torch.nn.Module, opt: Any, rank: int) -> None:
    if engine == "fsdp":
        import torch.distributed.checkpoint as dcp

        dcp.save(mpd.get_state_dict(net, opt), checkpoint_id=folder)
    else:
        state = mpd.get_state_dict(net, opt, full_state_dict=True)
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(state, folder / "mixprec.pt")
    dist.barrier()
    if rank == 0:
        print(f"saved {folder} after step {opt.precision.steps - 1}", flush=True)


def _load(folder: Path, engine: str, net: torch.nn.Module, opt: Any) -> int:
    if engine == "fsdp":
        import torch.distributed.checkpoint as dcp

        state = mpd.get_state_dict(net, opt)
        dcp.load(state, checkpoint_id=folder)
        mpd.set_state_dict(net, opt, state)
    else:
        mpd.set_state_dict(net, opt, torch.load(folder / "mixprec.pt", weights_only=True),
                           full_state_dict=True)
    return opt.precision.steps


if __name__ == "__main__":
    main()
