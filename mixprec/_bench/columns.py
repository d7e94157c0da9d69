"""The columns of the ``mixprec bench`` table, as data.

Each :class:`Column` says where its value comes from, how its cell reads and
what it means. The plain-text table, the rich table, the JSON file's
``columns`` and the table's values in each JSON row are all rendered from
:data:`COLUMNS`, in its order, so a new column is one more entry there (and a
row in the README's column table, which a test keeps in step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .run import MIB, RowResult

__all__ = ["COLUMNS", "Column"]


@dataclass(frozen=True)
class Column:
    """One column of the bench table.

    :param key: its name in the JSON file's ``columns`` (key -> ``help``).
    :param header: its header in the table (and in the README's column table).
    :param help: what it means, in one line.
    :param value: the row's value, as a plain number or text; None where there is none.
    :param json: where the value goes in a JSON row: a key, or ``outer.inner``.
    :param fmt: the value as the text of its cell (None is always a blank cell).
    :param numeric: right-aligned; the rich table breaks its header at the first space.
    :param wrap: the rich table may fold long cells (mode strings); the others never wrap.
    :param on_failure: the cell of a row that failed; None to show the value as in other rows.
    :param on_baseline: the cell of a baseline row, when it should not show the value.
    """

    key: str
    header: str
    help: str
    value: Callable[[RowResult], Any]
    json: str
    fmt: Callable[[Any], str] = str
    numeric: bool = True
    wrap: bool = False
    on_failure: str | None = ""
    on_baseline: str | None = None

    def cell(self, row: RowResult) -> str:
        """The text of this column in ``row``'s line of the table."""
        if row.status != "ok" and self.on_failure is not None:
            return self.on_failure
        if row.baseline and self.on_baseline is not None:
            return self.on_baseline
        value = self.value(row)
        return "" if value is None else self.fmt(value)

    def title(self) -> str:
        """The header in the rich table: numeric headers on two lines, to keep columns narrow."""
        return self.header.replace(" ", "\n", 1) if self.numeric else self.header


def _num(value: float, digits: int = 2) -> str:
    """Three significant figures or so: ``123``, ``12.3``, ``1.23``."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def _bytes_per_param(value: float) -> str:
    return f"{value:.2f}" if value >= 1 or value == 0 else f"{value:.3f}"


#: The table's columns, in order.
COLUMNS: list[Column] = [
    Column("mode", "mode", "the mode string (options in brackets)",
           lambda r: r.label, json="mode", numeric=False, wrap=True, on_failure=None),
    Column("run", "run",
           "full: trained from scratch; LoRA: adapters fine-tuned on a frozen quantized base",
           lambda r: r.run, json="run", numeric=False, on_failure=None),
    Column("step ms", "step ms",
           "median step time (forward, backward, clipping, optimizer step) after warm-up",
           lambda r: r.step_ms, json="step_ms", fmt=_num, on_failure="failed"),
    Column("speed", "speed",
           "32-true's step time / this mode's, measured in the same run, modes interleaved",
           lambda r: r.speed, json="speed", fmt=lambda v: f"{v:.2f}x"),
    Column("weights", "weights B/p",
           "bytes per parameter of the module's tensors (quantization state included)",
           lambda r: r.per_param(r.weight_bytes), json="bytes_per_param.weights",
           fmt=_bytes_per_param),
    Column("grads", "grads B/p",
           "bytes per parameter of the gradients after backward (fp32 masters' where they exist)",
           lambda r: r.per_param(r.grad_bytes) if r.measured else None,
           json="bytes_per_param.grads",
           fmt=_bytes_per_param),
    Column("optim", "optim B/p",
           "bytes per parameter of the optimizer state, fp32 master weights included",
           lambda r: r.per_param(r.optimizer_bytes), json="bytes_per_param.optimizer",
           fmt=_bytes_per_param),
    Column("state MiB", "state MiB", "weights + grads + optimizer state",
           lambda r: r.state_bytes / MIB if r.measured else None, json="state_mib", fmt=_num),
    Column("peak MiB", "peak MiB", "training state plus the most one step allocates on top of it",
           lambda r: None if r.peak_bytes is None else r.peak_bytes / MIB, json="peak_mib",
           fmt=_num),
    Column("loss", "loss", "final loss on held-out batches (nats/token)",
           lambda r: r.final_loss, json="final_loss", fmt=lambda v: f"{v:.3f}"),
    Column("vs 32-true", "vs 32-true", "the loss's gap to the 32-true row of the same run kind",
           lambda r: r.loss_gap_pct, json="loss_gap_pct", fmt=lambda v: f"{v:+.1f}%",
           on_baseline="baseline"),
    Column("skipped", "skipped", "steps skipped for inf/NaN gradients (loss scaler)",
           lambda r: r.skipped_steps, json="skipped_steps"),
]
