"""Shared parts of the benchmark scripts: model, data, interleaved timing, result files.

The scripts train the same small GPT as ``mixprec bench`` (``mixprec._bench.model``)
so numbers here and there describe the same workload.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mixprec
from mixprec._bench.model import BenchSize, MarkovTask, lm_loss, parse_size

RESULTS = Path(__file__).resolve().parent / "results"

Step = Callable[[torch.Tensor], float]


class SetupError(Exception):
    """An implementation could not be built; its row reports this message."""


def failing(exc: BaseException) -> Step:
    """A step that reports why its implementation could not be built."""
    message = f"setup failed: {type(exc).__name__}: {exc}"

    def step(batch: torch.Tensor) -> float:
        raise SetupError(message)
    return step


def common_args(parser: argparse.ArgumentParser, *, size: str = "small", steps: int = 20,
                repeats: int = 5, warmup: int = 5) -> None:
    parser.add_argument("--size", default=size,
                        help=f"bench model size: preset and/or key=value dims (default {size})")
    parser.add_argument("--steps", type=int, default=steps,
                        help=f"timed steps per implementation per repeat (default {steps})")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"rounds over all implementations (default {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=f"untimed steps per implementation first (default {warmup})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS), help=f"result folder (default {RESULTS})")
    parser.add_argument("--tag", default="",
                        help="suffix of the result file names (e.g. 'smoke'); default none")


def size_of(args: argparse.Namespace) -> BenchSize:
    try:
        return parse_size(args.size)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def batches(size: BenchSize, count: int, seed: int, device: str | torch.device) -> torch.Tensor:
    """``count`` batches of the bench's Markov task, on ``device``."""
    task = MarkovTask(size.vocab, seed)
    return task.batches(count, size.batch, size.seq, seed + 1).to(device)


def lm_step(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The bench's loss for one batch (fp32 cross entropy of next-token logits)."""
    return lm_loss(model(batch[:, :-1]), batch[:, 1:])


def machine(device: str | torch.device) -> dict[str, Any]:
    """Where the numbers were measured."""
    from mixprec._bench.report import machine_name

    dev = torch.device(device)
    return {
        "machine": machine_name(dev), "device": str(dev), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "mixprec": mixprec.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "date": datetime.date.today().isoformat(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


@dataclass
class Timing:
    """Step times of one implementation, over all repeats."""

    name: str
    times_ms: list[list[float]] = field(default_factory=list)  # per repeat
    losses: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median_ms(self) -> float | None:
        flat = [t for r in self.times_ms for t in r]
        return statistics.median(flat) if flat else None

    @property
    def repeat_medians(self) -> list[float]:
        return [statistics.median(r) for r in self.times_ms if r]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict[str, Step], data: torch.Tensor, *, warmup: int, timed: int,
                     repeats: int, device: str | torch.device) -> dict[str, Timing]:
    """Run every implementation on the same batches, ``timed`` steps at a time in turn.

    Each round runs the implementations one after the other (the order rotates
    every round), so a slow phase of the machine hits all of them. An
    implementation that raises is recorded with its error; the others go on.
    """
    dev = torch.device(device)
    names = list(steps)
    timings = {n: Timing(n) for n in names}
    cursor = dict.fromkeys(names, 0)

    def run(name: str, count: int, record: list[float] | None) -> None:
        timing = timings[name]
        for _ in range(count):
            if timing.error is not None:
                return
            batch = data[cursor[name] % len(data)]
            cursor[name] += 1
            _sync(dev)
            began = time.perf_counter()
            try:
                loss = steps[name](batch)
            except Exception as exc:  # reported in the table
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                timing.error = text if isinstance(exc, SetupError) else (
                    f"{type(exc).__name__}: {text}")
                return
            _sync(dev)
            if record is not None:
                record.append((time.perf_counter() - began) * 1e3)
            timing.losses.append(loss)

    for name in names:
        run(name, warmup, None)
    gc.collect()
    with _gc_paused():
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                record: list[float] = []
                run(name, timed, record)
                if record:
                    timings[name].times_ms.append(record)
            print(f"  repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return timings


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—" if value is None else str(value)
    return f"{value:.{digits}f}"


def short(text: str | None, limit: int = 110) -> str:
    """``text`` cut to ``limit`` characters for a table cell (the JSON keeps it whole)."""
    if not text:
        return ""
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, args: argparse.Namespace, payload: dict[str, Any],
                  table: str, notes: list[str]) -> Path:
    """``<out>/<name>[-tag].json`` and ``.md``; returns the Markdown path."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = name + (f"-{args.tag}" if args.tag else "")
    info = machine(args.device)
    command = "python benchmarks/" + name + ".py " + " ".join(sys.argv[1:])
    payload = {"benchmark": name, "command": command.strip(), **info, **payload}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md = [f"# {name}", "",
          f"`{command.strip()}` on {info['machine']} ({info['device']}, "
          f"{info['torch_threads']} torch threads, load average at the end "
          f"{', '.join(f'{x:.1f}' for x in info['load_average'] or [])}), torch {info['torch']}, "
          f"mixprec {info['mixprec']}, {info['date']}.", "", table, ""]
    md += [f"- {n}" for n in notes]
    path = out / f"{stem}.md"
    path.write_text("\n".join(md).rstrip() + "\n")
    print(path.read_text())
    return path
