"""Which modes ``mixprec bench`` runs, and how each one is run.

Every installed precision mode is trained from scratch, optimizer modes are
joined to ``32-true``, and modes tagged ``frozen-weights`` (quantized, frozen
weights) are run as a LoRA fine-tune. The plan decides by the tags a mode's
``ModeSpec`` declares, never by its name: ``slow-on-cpu`` modes on a CPU,
``cuda-only`` modes without a CUDA device and LoRA runs without peft are left
out of the default selection with the reason, and so is a default mode without
such tags whose ``wrap`` says it cannot run on this device or lacks a library. A
mode selected by name is always attempted, and fails loudly.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import registry
from .._modestring import format_part, parse_mode_string, split_mode_list
from ..exceptions import ModeSyntaxError

__all__ = ["BASELINE", "ModeChoice", "parse_modes", "plan"]

BASELINE = "32-true"
#: The core modes in the order the table shows them; plugin modes follow, sorted.
CORE_ORDER = ("32-true", "bf16-mixed", "bf16-true", "bf16-true[master_weights=True]",
              "16-mixed", "16-true", "64-true")
#: Why a default run leaves out a mode tagged ``slow-on-cpu`` on a CPU.
SLOW_ON_CPU_REASON = ("on a CPU, FP8 matmuls run through torch._scaled_mm's slow reference path; "
                      "left out of the default run to keep it short: name it in --modes to run it")


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
    :param tags: the tags the installed modes of the mode string declare (see
        ``mixprec._interface.TAGS``); empty for modes that are not installed.
    """

    label: str
    mode: str
    options: dict[str, Any] = field(default_factory=dict)
    lora: bool = False
    baseline: bool = False
    error: str | None = None
    explicit: bool = True
    tags: frozenset[str] = frozenset()

    @property
    def run(self) -> str:
        return "LoRA" if self.lora else "full"


def split_labels(text: str) -> list[str]:
    """Split ``--modes`` on commas outside brackets."""
    return split_mode_list(text)


def parse_label(label: str) -> ModeChoice:
    """``"bf16-true[master_weights=True]+adamw8bit"`` -> mode string and options.

    The options of the first part become keyword options of ``wrap``; later parts keep
    theirs in brackets. A label that does not follow the grammar gives a choice with
    ``error`` set: its row fails with that message, the other rows still run.
    """
    try:
        parts = parse_mode_string(label)
    except ModeSyntaxError as exc:
        return ModeChoice(label, label, error=str(exc))
    first, rest = parts[0], parts[1:]
    mode = "+".join([first.name, *(format_part(p.name, p.options) for p in rest)])
    tags = [_tags(p.name) for p in parts]
    return ModeChoice(label, mode, dict(first.options), lora="frozen-weights" in tags[0],
                      tags=frozenset().union(*tags))


def _tags(name: str) -> frozenset[str]:
    """The tags the installed mode ``name`` declares; none if it is not installed (its
    row then fails at ``wrap``, which says what to install)."""
    entry = registry().modes().get(name)
    return frozenset() if entry is None else frozenset(entry.spec.tags)


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
        if device.type != "cuda" and "cuda-only" in choice.tags:
            left_out.append((label, _cuda_only_reason(choice, device)))
        elif device.type == "cpu" and "slow-on-cpu" in choice.tags:
            left_out.append((label, SLOW_ON_CPU_REASON))
        elif choice.lora and not peft_available():
            left_out.append((label, "benchmarked as a LoRA fine-tune, which needs peft: "
                                    "pip install 'mixprec[bench]'"))
        else:
            chosen.append(choice)
    return chosen, left_out


def _cuda_only_reason(choice: ModeChoice, device: torch.device) -> str:
    """Why a mode tagged ``cuda-only`` is not run on ``device``, with what it requires."""
    entries = registry().modes()
    specs = [entries[p.name].spec for p in parse_mode_string(choice.label) if p.name in entries]
    needs = [s.requires for s in specs if "cuda-only" in s.tags and s.requires not in ("", "CUDA")]
    what = "needs a CUDA GPU" + "".join(f" ({r})" for r in needs)
    if torch.cuda.is_available():
        return f"{what}, and the bench runs on {device}: use --device cuda"
    return f"{what}, and torch finds no CUDA device here: run the bench on a machine with one"


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
