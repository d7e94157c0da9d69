"""Data-parallel speed: N-process DDP (and FSDP2) against one process, same cores.

Trains the bench GPT (``mixprec._bench.model``) on the same global batches: one
process with all the threads, or ``--world`` ranks (gloo on the CPU, NCCL on
GPUs) each with its share of the threads and of every batch. Launches alternate
(one process, DDP, FSDP2, one process, …) and each reports per-step wall times
of rank 0 after a warm-up; the table gives medians over all timed steps, the
speed-up over one process and the largest difference of the step losses (mean
over ranks) from the single process's, which must be small: same global batch.

    python benchmarks/ddp_speed.py                         # numbers (idle machine)
    python benchmarks/ddp_speed.py --size tiny --steps 3 --repeats 1 --warmup 1 --tag smoke
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

import mixprec
import mixprec.distributed as mpd
from mixprec._bench.model import BenchGPT, BenchSize

LR = 3e-3


def _rank(rank: int, world: int, root: str, engine: str, mode: str, size: BenchSize,
          args: dict[str, Any], threads: int) -> None:
    """One rank of one launch (``world == 1``: the single process)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(threads)
    device = torch.device(args["device"])
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"file://{root}/rendezvous", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(args["seed"])
    model = BenchGPT(size).to(device)
    if engine == "fsdp":
        mpd.fully_shard(model, mode, modules=model.blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    model, opt = mixprec.wrap(model, opt, mode)
    net = DDP(model, device_ids=[rank] if device.type == "cuda" else None) \
        if engine == "ddp" else model
    data = _common.batches(size, args["warmup"] + args["steps"], args["seed"], device)
    per = size.batch // world
    times, losses = [], []
    for i, batch in enumerate(data):
        part = batch[rank * per:(rank + 1) * per]
        _common._sync(device)
        began = time.perf_counter()
        loss = _common.lm_step(net, part)
        opt.backward(loss)
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        value = float(loss.detach())  # a sync point on every device, as a training log has
        _common._sync(device)
        if i >= args["warmup"]:
            times.append((time.perf_counter() - began) * 1e3)
        losses.append(value)
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, losses)
        losses = [statistics.fmean(step) for step in zip(*gathered)]
        dist.barrier()  # nobody tears the group down while another rank still talks
        dist.destroy_process_group()
    if rank == 0:
        torch.save({"times": times, "losses": losses}, Path(root) / "result.pt")


def _launch(engine: str, mode: str, world: int, size: BenchSize, args: argparse.Namespace,
            threads: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as root:
        mp.start_processes(_rank, args=(world, root, engine, mode, size, vars(args), threads),
                           nprocs=world, join=True, start_method="spawn")
        return torch.load(Path(root) / "result.pt", weights_only=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.common_args(parser, steps=20, repeats=3, warmup=5)
    parser.add_argument("--modes", default="32-true,bf16-mixed",
                        help="comma-separated modes (default 32-true,bf16-mixed)")
    parser.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--engines", default="ddp,fsdp",
                        help="data-parallel engines against one process (default ddp,fsdp)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads in all (default: torch's current count, at least "
                             "--world); each rank of a launch gets threads / world")
    args = parser.parse_args(argv)
    size = _common.size_of(args)
    if size.batch % args.world:
        raise SystemExit(f"The batch ({size.batch}) must split evenly over --world "
                         f"{args.world}; pick a size with batch=... divisible by it.")
    per_rank = max(1, (args.threads or torch.get_num_threads()) // args.world)
    threads = per_rank * args.world  # the same total on both sides
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in range(args.repeats):
        for mode in modes:
            for engine in ["single", *engines]:
                world = 1 if engine == "single" else args.world
                got = _launch(engine, mode, world, size, args,
                              threads if engine == "single" else per_rank)
                runs.setdefault((mode, engine), []).append(got)
        print(f"  repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    rows, payload = [], []
    for mode in modes:
        single = runs[(mode, "single")]
        base = statistics.median(t for run in single for t in run["times"])
        for engine in ["single", *engines]:
            got = runs[(mode, engine)]
            ms = statistics.median(t for run in got for t in run["times"])
            gap = max(abs(a - b) for a, b in zip(got[0]["losses"], single[0]["losses"]))
            tokens = size.batch * size.seq / (ms / 1e3)
            label = "1 process" if engine == "single" else f"{args.world}-rank {engine.upper()}"
            cores = threads if engine == "single" else f"{args.world} x {per_rank}"
            rows.append([mode, label, str(cores), _common.fmt(ms), f"{tokens:,.0f}",
                         _common.fmt(base / ms), f"{gap:.1e}"])
            payload.append({"mode": mode, "engine": engine, "median_ms": ms,
                            "tokens_per_s": tokens, "speedup": base / ms, "loss_gap": gap,
                            "repeat_medians": [statistics.median(r["times"]) for r in got]})
    table = _common.markdown_table(
        ["mode", "run", "threads", "ms/step", "tokens/s", "speed-up", "loss gap"], rows)
    notes = [
        f"{size.describe()}; AdamW, clip to norm 1; global batch {size.batch} split over the "
        f"ranks; {args.repeats} launches x {args.steps} timed steps after {args.warmup} "
        "warm-up steps each; medians over all timed steps of rank 0.",
        "loss gap: largest |mean-over-ranks loss - single-process loss| over the steps "
        "(same global batches, so only reduction order and low-precision rounding differ).",
        "Same total threads on both sides: data parallelism on one CPU only pays where a "
        "single process cannot use all cores well (small matmuls); on GPUs each rank has "
        "its own device, which this CPU table cannot show.",
    ]
    _common.write_results("ddp_speed", args, {"size": vars(size), "world": args.world,
                                              "threads": threads, "rows": payload}, table, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
