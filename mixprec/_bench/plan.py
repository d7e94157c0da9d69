"""Which modes ``mixprec bench`` runs, and how each one is run.

Every installed precision mode is trained from scratch, optimizer modes are
joined to ``32-true``, and modes that freeze quantized weights (``nf4*``,
``fp4*``, ``int8``) are run as a LoRA fine-tune. FP8 modes on a CPU and LoRA
runs without peft are left out of the default selection with the reason, and
so is a default mode whose ``wrap`` says it cannot run on this device or lacks
a library; a mode selected by name is always attempted, and fails loudly.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import registry

__all__ = ["BASELINE", "ModeChoice", "parse_modes", "plan"]

BASELINE = "32-true"
#: Precision modes whose weights are quantized and frozen: benchmarked as LoRA fine-tunes.
FROZEN_WEIGHT_MODES = ("nf4*", "fp4*", "int8")
#: Modes that run on a CPU only through a slow reference path (``torch._scaled_mm`` in
#: float8); modes that cannot run on a CPU at all (Transformer Engine) say so at ``wrap``.
SLOW_ON_CPU = ("fp8-*",)
#: The core modes in the order the table shows them; plugin modes follow, sorted.
CORE_ORDER = ("32-true", "bf16-mixed", "bf16-true", "bf16-true[master_weights=True]",
              "16-mixed", "16-true", "64-true")

_LABEL = re.compile(
    r"^(?P<prec>[a-z0-9][a-z0-9._-]*)(?:\[(?P<opts>[^\[\]]*)\])?(?P<rest>(?:\+[a-z0-9][a-z0-9._-]*)*)$"
)


@dataclass
class ModeChoice:
    """One row of the bench: a mode string, its options and how it is trained.

    :param label: the text in the table's mode column (``"bf16-true[master_weights=True]"``).
    :param mode: the mode string passed to :func:`mixprec.wrap`.
    :param options: options for the precision mode.
    :param lora: run as a LoRA fine-tune of a pretrained base.
    :param baseline: the ``32-true`` row the others are compared with.
    :param error: why the label could not be read (the row then fails).
    :param explicit: named in ``--modes``; a mode from the default selection that
        says it cannot run on this device is left out instead of failing.
    """

    label: str
    mode: str
    options: dict[str, Any] = field(default_factory=dict)
    lora: bool = False
    baseline: bool = False
    error: str | None = None
    explicit: bool = True

    @property
    def run(self) -> str:
        return "LoRA" if self.lora else "full"


def split_labels(text: str) -> list[str]:
    """Split ``--modes`` on commas outside brackets."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return [p for p in parts if p]


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_label(label: str) -> ModeChoice:
    """``"bf16-true[master_weights=True]+adamw8bit"`` -> mode string and options."""
    match = _LABEL.match(label)
    if match is None:  # let the registry word the syntax error
        return ModeChoice(label, label)
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in (match["opts"] or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            return ModeChoice(label, label, error=(
                f"Cannot read the options of {label!r}: {item!r} is not key=value; "
                "write e.g. 'bf16-true[master_weights=True]'."))
        options[key.strip()] = _value(value.strip())
    mode = match["prec"] + match["rest"]
    return ModeChoice(label, mode, options, lora=freezes_weights(mode))


def freezes_weights(mode: str) -> bool:
    """True if the precision part of ``mode`` quantizes and freezes the weights."""
    precision = mode.split("+", 1)[0]
    return any(fnmatch.fnmatchcase(precision, p) for p in FROZEN_WEIGHT_MODES)


def parse_modes(text: str) -> list[ModeChoice]:
    """The modes named by ``--modes`` (comma-separated labels), in order, without repeats."""
    seen: set[str] = set()
    out = []
    for label in split_labels(text):
        if label not in seen:
            seen.add(label)
            out.append(parse_label(label))
    return out


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def default_modes(device: torch.device) -> tuple[list[ModeChoice], list[tuple[str, str]]]:
    """Every installed mode this device can run, and the ones left out with the reason."""
    entries = registry().modes()
    precision = [n for n, e in entries.items() if e.spec.kind == "precision"]
    optimizers = [n for n, e in entries.items() if e.spec.kind == "optimizer"]
    labels = [m for m in CORE_ORDER if m.split("[")[0] in entries]
    labels += sorted(n for n in precision if n not in CORE_ORDER)
    labels += [f"{BASELINE}+{n}" for n in sorted(optimizers)]
    chosen: list[ModeChoice] = []
    left_out: list[tuple[str, str]] = []
    for label in labels:
        choice = parse_label(label)
        choice.explicit = False
        names = choice.mode.split("+")
        if device.type == "cpu" and any(fnmatch.fnmatchcase(n, p) for n in names
                                        for p in SLOW_ON_CPU):
            left_out.append((label, "on a CPU, FP8 matmuls run through torch._scaled_mm's slow "
                                    "reference path; left out of the default run to keep it "
                                    "short: name it in --modes to run it"))
        elif choice.lora and not peft_available():
            left_out.append((label, "benchmarked as a LoRA fine-tune, which needs peft: "
                                    "pip install 'mixprec[bench]'"))
        else:
            chosen.append(choice)
    return chosen, left_out


def plan(
    modes: str | None, device: torch.device
) -> tuple[list[ModeChoice], list[tuple[str, str]]]:
    """The rows to run (baselines first) and the installed modes left out, with reasons.

    The ``32-true`` baseline is added for full runs, and a ``32-true`` LoRA
    baseline for LoRA runs, when they are not selected already.
    """
    if modes is None:
        chosen, left_out = default_modes(device)
    else:
        chosen, left_out = parse_modes(modes), []
    full = [c for c in chosen if not c.lora]
    lora = [c for c in chosen if c.lora]
    rows: list[ModeChoice] = []
    if full:
        base = next((c for c in full if c.mode == BASELINE and not c.options), None)
        if base is None:
            base = ModeChoice(BASELINE, BASELINE)
        else:
            full.remove(base)
        base.baseline = True
        rows += [base, *full]
    if lora:
        rows.append(ModeChoice(BASELINE, BASELINE, lora=True, baseline=True))
        rows += lora
    return rows, left_out
