"""Showing a bench run: the table, the JSON file, the plot and the progress bars.

rich and matplotlib are optional: without rich the progress is a few plain
lines and the table is plain text; ``--plot`` needs matplotlib and says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import torch

from .._version import __version__
from .columns import COLUMNS
from .memory import memory_method
from .run import MIB, BenchResult, RowResult, summary_of

__all__ = ["machine_name", "plain_table", "print_report", "progress_bars", "to_json",
           "write_json", "write_plot"]


def machine_name(device: torch.device) -> str:
    """The processor (or GPU) the bench ran on, in words."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def table_rows(result: BenchResult) -> list[list[str]]:
    """The table as strings, one list per row, one cell per column of :data:`COLUMNS`."""
    return [[c.cell(r) for c in COLUMNS] for r in result.rows]


def header_lines(result: BenchResult) -> list[str]:
    c = result.config
    params = result.rows[0].params if result.rows else 0
    threads = "" if c.device.type == "cuda" else f", {torch.get_num_threads()} torch threads"
    return [
        f"mixprec bench: {c.size.describe()}; {params:,} parameters",
        f"task: second-order Markov source over {c.size.vocab} tokens; best possible loss "
        f"{result.loss_floor:.3f} nats/token, uniform guess {math.log(c.size.vocab):.3f}",
        f"device: {c.device} ({machine_name(c.device)}{threads}); {c.steps} steps per mode, "
        f"seed {c.seed}; step time = median after {c.warmup} warm-up steps",
        *([partial_line(result)] if result.partial else []),
    ]


def partial_line(result: BenchResult) -> str:
    """What a run stopped by Ctrl-C shows, and how its rows are computed."""
    return (f"partial: interrupted after {result.interrupted_after} of {result.config.steps} "
            "steps; each row is computed from the steps its mode completed")


def footer_lines(result: BenchResult) -> list[str]:
    lines = [f"memory: {memory_method(result.config.device)}"]
    lines += [f"note: {n}" for n in result.notes]
    for label, reason in result.left_out:
        lines.append(f"not run: {label}: {reason}")
    for r in result.failed:
        lines.append(f"FAILED: {r.label} ({r.run}): {r.error}")
    return lines


def plain_table(result: BenchResult) -> str:
    """The whole report as plain text."""
    headers, rows = [c.header for c in COLUMNS], table_rows(result)
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if col.numeric else c.ljust(w)
                         for col, c, w in zip(COLUMNS, cells, widths)).rstrip()

    body = [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    return "\n".join([*header_lines(result), "", *body, "", *footer_lines(result)])


def print_report(result: BenchResult, out: TextIO | None = None) -> None:
    """Print the report: a rich table on a terminal where rich is installed, else plain."""
    out = sys.stdout if out is None else out
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(plain_table(result), file=out)
        return
    if not out.isatty():
        print(plain_table(result), file=out)
        return
    from rich import box
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in COLUMNS:
        table.add_column(col.title(), justify="right" if col.numeric else "left",
                         no_wrap=not col.wrap, overflow="fold")
    for cells, r in zip(table_rows(result), result.rows):
        table.add_row(*(Text(c) for c in cells), style="red" if r.status != "ok" else None)
    console = Console(file=out)
    # Never squeeze the table: on a narrow terminal its lines wrap, as plain text would.
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    console = Console(file=out, width=max(console.width, natural))
    for line in header_lines(result):
        console.print(Text(line, style="red" if line.startswith("partial") else ""))
    console.print(table)
    for line in footer_lines(result):
        console.print(Text(line, style="red" if line.startswith("FAILED") else ""))


def to_json(result: BenchResult) -> dict[str, Any]:
    """Everything the table shows, and the per-step losses and times, as plain values."""
    device = result.config.device
    rows = [_json_row(r) for r in result.rows]
    return {
        "mixprec": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "machine": machine_name(device),
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "config": summary_of(result),
        "partial": result.partial,
        "steps_done": result.config.steps if result.interrupted_after is None
        else result.interrupted_after,
        "task": {"name": "second-order Markov source", "vocab": result.config.size.vocab,
                 "loss_floor": result.loss_floor,
                 "uniform_loss": math.log(result.config.size.vocab)},
        "memory_method": memory_method(device),
        "columns": {c.key: c.help for c in COLUMNS},
        "rows": rows,
        "not_run": [{"mode": m, "reason": why} for m, why in result.left_out],
        "notes": result.notes,
    }


def _json_row(r: RowResult) -> dict[str, Any]:
    """One row of the JSON file: the value of every column (at its ``json`` place), then
    what the table leaves out (exact bytes, per-step losses and times)."""
    row: dict[str, Any] = {}
    for col in COLUMNS:
        outer, _, inner = col.json.partition(".")
        if inner:
            row.setdefault(outer, {})[inner] = col.value(r)
        else:
            row[outer] = col.value(r)
    row.update({
        "mode_string": r.mode, "baseline": r.baseline, "status": r.status, "error": r.error,
        "params": r.params,
        "steps": r.steps,
        "bytes": {"weights": r.weight_bytes, "grads": r.grad_bytes if r.measured else None,
                  "optimizer": r.optimizer_bytes,
                  "state": r.state_bytes if r.measured else None, "peak": r.peak_bytes},
        "loss_gap": r.loss_gap, "losses": r.losses, "step_ms_all": r.step_ms_all,
        "summary": r.summary,
    })
    return row


def write_json(result: BenchResult, path: str | Path) -> None:
    """:func:`to_json` to a file (inf/NaN losses of skipped steps become null)."""
    Path(path).write_text(json.dumps(_finite(to_json(result)), indent=2, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(result: BenchResult, path: str | Path) -> None:
    """Loss curves per mode and a bar chart of the training state, to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.status == "ok"]
    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(13, 5),
                                          gridspec_kw={"width_ratios": [3, 2]})
    for r in rows:
        style = "--" if r.run == "LoRA" else "-"
        losses = [x if math.isfinite(x) else float("nan") for x in r.losses]
        ax_loss.plot(range(1, len(losses) + 1), losses, style, lw=1.2,
                     label=f"{r.label} ({r.run})" if r.run == "LoRA" else r.label)
    ax_loss.axhline(result.loss_floor, color="grey", lw=0.8, ls=":", label="best possible")
    ax_loss.set(xlabel="step", ylabel="training loss (nats/token)", title="loss per step")
    ax_loss.legend(fontsize=7)
    labels = [f"{r.label} ({r.run})" if r.run == "LoRA" else r.label for r in rows]
    left = [0.0] * len(rows)
    for name, attr in (("weights", "weight_bytes"), ("grads", "grad_bytes"),
                       ("optimizer", "optimizer_bytes")):
        values = [getattr(r, attr) / MIB for r in rows]
        ax_mem.barh(labels, values, left=left, label=name)
        left = [a + b for a, b in zip(left, values)]
    peaks = [(i, r.peak_bytes / MIB) for i, r in enumerate(rows) if r.peak_bytes is not None]
    if peaks:
        ax_mem.scatter([p for _, p in peaks], [i for i, _ in peaks], marker="|", s=200,
                       color="black", label="peak", zorder=3)
    ax_mem.invert_yaxis()
    ax_mem.set(xlabel="MiB", title="training state and step peak")
    ax_mem.legend(fontsize=7)
    fig.suptitle(f"mixprec bench: {result.config.size.describe()} on {result.config.device}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


Advance = Callable[[int], None]


@contextlib.contextmanager
def progress_bars(quiet: bool) -> Iterator[Callable[[str, int], Advance]]:
    """``start(description, total)`` -> ``advance(n)``: rich bars on stderr, plain lines
    without rich or when stderr is not a terminal (a log file, a pipe: rich would show
    nothing there until the end), nothing when ``quiet``."""
    if quiet:
        yield lambda description, total: lambda n: None
        return
    if not sys.stderr.isatty():
        yield _plain_progress
        return
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:
        yield _plain_progress
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bars:
        def start(description: str, total: int) -> Advance:
            task = bars.add_task(description, total=total)
            return lambda n: bars.advance(task, n)

        yield start


def _plain_progress(description: str, total: int) -> Advance:
    print(f"{description} ...", file=sys.stderr, flush=True)
    state = {"done": 0, "shown": 0}

    def advance(n: int) -> None:
        state["done"] += n
        tenth = state["done"] * 10 // max(1, total)
        if tenth > state["shown"]:
            state["shown"] = tenth
            print(f"  {tenth * 10}% ({state['done']}/{total})", file=sys.stderr, flush=True)

    return advance
