"""Showing a doctor report: the tables (plain or rich), the JSON file, the heatmap.

The plain text is what ``print(report)`` shows; ``mixprec doctor`` uses rich tables
on a terminal where rich is installed. ``--plot`` draws the per-layer sensitivity
(model-output SQNR with only that layer converted) per mode as a heatmap.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .measure import OUTPUT

if TYPE_CHECKING:
    from .result import DoctorReport, ModeResult

__all__ = ["detail_table", "layer_table", "mode_table", "plain_report", "plot_available",
           "print_report", "write_json", "write_plot"]


def _db(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    return "inf" if math.isinf(x) and x > 0 else f"{x:.1f}"


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:+.{digits}f}%"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None or math.isnan(x) else format(x, fmt)


MODE_HEADERS = ["mode", "loss", "vs 32-true", "B/param", "step ms", "output dB",
                "most sensitive layer", "lost updates", "problems"]


def _worst(r: ModeResult) -> str:
    ranked = [lr for lr in r.ranked() if lr.impact_db is not None and not math.isinf(lr.impact_db)]
    if not ranked:
        return "-"
    return f"{ranked[0].name} {_db(ranked[0].impact_db)} dB"


def mode_table(report: DoctorReport) -> tuple[list[str], list[list[str]]]:
    """One row per examined mode."""
    rows = []
    for r in report.modes:
        problems = ", ".join(f.cause for f in r.flags) or "-"
        if r.status != "ok":
            problems = (problems + ", " if r.flags else "") + "FAILED (see below)"
        rows.append([r.label, _num(r.final_loss), _pct(r.gap_pct),
                     _num(r.bytes_per_param, ".2f"), _num(r.step_ms, ".1f"), _db(r.output_db),
                     _worst(r), _share(r.lost), problems])
    return MODE_HEADERS, rows


def _identical(r: ModeResult) -> bool:
    """Every layer computes exactly as fp32 (32-true, optimizer modes on it)."""
    return all(lr.impact_db is not None and math.isinf(lr.impact_db) and lr.impact_db > 0
               for lr in r.layers)


def layer_table(report: DoctorReport) -> tuple[list[str], list[list[str]]]:
    """Per layer, per mode: the model output's SQNR with only that layer converted (dB);
    modes whose every layer computes exactly as fp32 are left out (see
    :func:`identical_modes`)."""
    modes = [r for r in report.modes if r.layers and not _identical(r)]
    names = [lr.name for lr in modes[0].layers] if modes else []
    headers = ["layer", "kind", *(r.label for r in modes)]
    rows = []
    for name in names:
        kind = next((lr.kind for r in modes if (lr := r.layer(name))), "")
        cells = []
        for r in modes:
            lr = r.layer(name)
            cell = _db(None if lr is None else lr.impact_db)
            if lr is not None and lr.overflow:
                cell += " OVERFLOW"
            cells.append(cell)
        rows.append([name, kind, *cells])
    return headers, rows


DETAIL_HEADERS = ["layer", "dtype", "own dB", "impact dB", "impact loss", "grad dB",
                  "act amax", "grad amax", "fp16 underflow", "lost"]


def identical_modes(report: DoctorReport) -> list[str]:
    """The modes whose forward is exactly fp32's (their SQNR is infinite everywhere)."""
    return [r.label for r in report.modes if r.layers and _identical(r)]


def detail_table(result: ModeResult) -> tuple[list[str], list[list[str]]]:
    """Every measurement of every layer of one mode."""
    rows = []
    for lr in result.layers:
        rows.append([lr.name, lr.dtype or "-", _db(lr.out_db), _db(lr.impact_db),
                     _pct(lr.impact_pct, 3), _db(lr.grad_db),
                     "-" if lr.name == OUTPUT else f"{lr.act_amax:.3g}" + (" OVERFLOW" if lr.overflow else ""),
                     "-" if lr.name == OUTPUT else f"{lr.grad_amax:.3g}",
                     _share(lr.underflow), _share(lr.lost)])
    return DETAIL_HEADERS, rows


def _plain_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    numeric = [i > 0 and all(_is_number(r[i]) for r in rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w)
                         for c, w, n in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _is_number(text: str) -> bool:
    head = text.split(" ")[0].rstrip("%").lstrip("+")
    try:
        float(head)
    except ValueError:
        return head in ("-", "inf", "nan")
    return True


def _layer_title(report: DoctorReport) -> str:
    same = identical_modes(report)
    text = "per-layer sensitivity: model-output SQNR (dB) with only that layer converted"
    return text + (f" ({', '.join(same)}: identical to fp32, not shown)" if same else "")


def header_lines(report: DoctorReport) -> list[str]:
    base = "-" if report.baseline_loss is None else f"{report.baseline_loss:.4f}"
    return [
        f"mixprec doctor: {report.model}, {report.params:,} parameters, on {report.device}",
        f"{report.measure_batches} batch(es) measured per layer; a short run of {report.steps} "
        f"steps on {report.train_batches} batch(es) per mode, same data and weights; "
        f"32-true loss {base}",
    ]


def finding_lines(report: DoctorReport) -> list[str]:
    lines = []
    for r in report.modes:
        for f in r.flags:
            lines.append(f"{r.label}: {f.cause}: {f.message}")
        if r.status != "ok":
            lines.append(f"{r.label}: FAILED: {r.error}")
    return lines


def verdict_lines(report: DoctorReport) -> list[str]:
    verdicts = report.recommendation.verdicts
    return ["per mode:", *(f"  {label}: {text}" for label, text in verdicts.items())]


def recommendation_lines(report: DoctorReport) -> list[str]:
    rec = report.recommendation
    lines = ["recommendation:"]
    if rec.wrap_line:
        lines.append(f"  {rec.wrap_line}")
    lines += [f"  - {r}" for r in rec.reasons]
    return lines


def footer_lines(report: DoctorReport) -> list[str]:
    reasons: dict[str, list[str]] = {}
    for mode, why in report.left_out:
        reasons.setdefault(why, []).append(mode)
    lines = [f"not examined: {', '.join(modes)}: {why}" for why, modes in reasons.items()]
    lines.append(
        f"thresholds: loss within {report.loss_threshold:g}% of 32-true; a layer is kept in "
        f"full precision (ignore_modules) when, converted alone, it brings the model output "
        f"below {report.sqnr_threshold:g} dB SQNR or overflows fp16; a layer losing more than "
        f"{100 * report.lost_threshold:g}% of its updates to rounding blocks a mode")
    return lines


def plain_report(report: DoctorReport, detail: bool = False) -> str:
    """The whole report as plain text."""
    parts = ["\n".join(header_lines(report)), _plain_table(*mode_table(report)),
             _layer_title(report), _plain_table(*layer_table(report))]
    if detail:
        for r in report.modes:
            if r.layers:
                parts += [f"{r.label}: every layer", _plain_table(*detail_table(r))]
    findings = finding_lines(report)
    if findings:
        parts.append("\n".join(["findings:", *(f"  {x}" for x in findings)]))
    parts += ["\n".join(verdict_lines(report)), "\n".join(recommendation_lines(report)),
              "\n".join(footer_lines(report))]
    return "\n\n".join(parts)


def print_report(report: DoctorReport, out: TextIO | None = None, detail: bool = False) -> None:
    """Rich tables on a terminal where rich is installed, else the plain text."""
    out = sys.stdout if out is None else out
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(plain_report(report, detail), file=out)
        return
    if not out.isatty():
        print(plain_report(report, detail), file=out)
        return

    def table(headers: list[str], rows: list[list[str]], title: str | None = None) -> Table:
        t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
        for i, h in enumerate(headers):
            t.add_column(h, justify="right" if i > 0 and all(_is_number(r[i]) for r in rows)
                         else "left")
        for r in rows:
            style = "red" if any("FAILED" in c or "OVERFLOW" in c for c in r) else None
            t.add_row(*(Text(c) for c in r), style=style)
        return t

    console = Console(file=out)
    for line in header_lines(report):
        console.print(Text(line))
    console.print(table(*mode_table(report)))
    console.print(table(*layer_table(report), title=_layer_title(report)))
    if detail:
        for r in report.modes:
            if r.layers:
                console.print(table(*detail_table(r), title=f"{r.label}: every layer"))
    for line in ["findings:", *(f"  {x}" for x in finding_lines(report))] \
            if finding_lines(report) else []:
        console.print(Text(line))
    for line in verdict_lines(report):
        console.print(Text(line))
    for i, line in enumerate(recommendation_lines(report)):
        console.print(Text(line, style="bold green" if i == 1 else ""))
    for line in footer_lines(report):
        console.print(Text(line, style="dim"))


def write_json(report: DoctorReport, path: str | Path) -> None:
    """Every number of the report to a JSON file."""
    Path(path).write_text(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")


def write_plot(report: DoctorReport, path: str | Path) -> None:
    """Per-layer sensitivity (model-output SQNR with only that layer converted) per mode,
    as a heatmap PNG; identical layers (infinite SQNR) show at the top of the scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    _, rows = layer_table(report)
    modes = [r for r in report.modes if r.layers and not _identical(r)]
    names = [row[0] for row in rows]
    values = np.full((len(names), len(modes)), np.nan)
    for j, r in enumerate(modes):
        for i, name in enumerate(names):
            lr = r.layer(name)
            if lr is not None and lr.impact_db is not None:
                values[i, j] = lr.impact_db
    finite = values[np.isfinite(values)]
    top = float(finite.max()) + 5 if finite.size else 100.0
    shown = np.where(np.isposinf(values), top, values)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(modes), 1.2 + 0.28 * len(names)))
    image = ax.imshow(shown, aspect="auto", cmap="RdYlGn", vmin=0, vmax=max(top, 1.0))
    ax.set_xticks(range(len(modes)), [r.label for r in modes], rotation=40, ha="right",
                  fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for i in range(len(names)):
        for j in range(len(modes)):
            v = values[i, j]
            text = "" if np.isnan(v) else ("=" if np.isposinf(v) else f"{v:.0f}")
            ax.text(j, i, text, ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label="model-output SQNR with only this layer converted (dB)")
    ax.set_title(f"mixprec doctor: {report.model}, per-layer sensitivity", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
