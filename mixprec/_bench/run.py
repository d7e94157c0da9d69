"""Training every selected mode side by side: the engine of ``mixprec bench``.

All rows train copies of one model on the same batches, one step of each row
in turn (the order rotates every step), so slow phases of a shared machine
hit every mode alike. Step times are medians after warm-up; one warm-up step
per row is run under memory tracking. A Ctrl-C during training stops it
cleanly: every row is finished from the steps its mode completed and the
result is marked partial.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import wrap
from ..exceptions import MissingDependencyError, MixprecError, UnsupportedDeviceError
from .memory import PeakTracker, StorageCounter, module_tensors, optimizer_tensors
from .model import BenchGPT, BenchSize, MarkovTask, lm_loss, lora_targets
from .plan import BASELINE, ModeChoice, peft_available

__all__ = ["BenchConfig", "BenchResult", "RowResult", "run_bench"]

MIB = 2**20


@dataclass(frozen=True)
class BenchConfig:
    """What one bench run trains, and how.

    :param warmup: steps per row left out of the step-time median (the last
        one is the memory-tracked step).
    :param pretrain_steps: fp32 steps that train the base of the LoRA runs.
    """

    size: BenchSize
    steps: int
    seed: int
    device: torch.device
    lr: float = 3e-3
    clip: float = 1.0
    warmup: int = 2
    pretrain_steps: int = 0
    eval_batches: int = 4
    lora_rank: int = 8

    @staticmethod
    def warmup_for(steps: int) -> int:
        return min(10, max(2, steps // 10))


@dataclass
class RowResult:
    """One row of the table (all byte counts exact, from the tensors)."""

    label: str
    mode: str
    run: str
    baseline: bool
    status: str = "ok"
    error: str | None = None
    params: int = 0
    step_ms: float | None = None
    step_ms_all: list[float] = field(default_factory=list)
    speed: float | None = None
    weight_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    peak_bytes: int | None = None
    final_loss: float | None = None
    loss_gap: float | None = None
    loss_gap_pct: float | None = None
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    summary: str = ""

    @property
    def state_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def measured(self) -> bool:
        """The memory-tracked warm-up step ran: the gradients' bytes and the peak are known
        (not so in a run interrupted before it)."""
        return self.peak_bytes is not None

    @property
    def steps(self) -> int:
        """Training steps this row completed."""
        return len(self.losses)

    def per_param(self, nbytes: int) -> float:
        return nbytes / self.params if self.params else float("nan")


@dataclass
class BenchResult:
    """Everything a bench run found; rendered by ``report``."""

    config: BenchConfig
    rows: list[RowResult]
    left_out: list[tuple[str, str]]
    loss_floor: float
    notes: list[str]
    #: Steps every row completed before a Ctrl-C stopped the run; None when it ran to the end.
    interrupted_after: int | None = None

    @property
    def failed(self) -> list[RowResult]:
        return [r for r in self.rows if r.status != "ok"]

    @property
    def partial(self) -> bool:
        """Stopped by a Ctrl-C: the rows hold the steps done until then."""
        return self.interrupted_after is not None


class _Row:
    """A model and optimizer wrapped in one mode, trained step by step."""

    def __init__(self, choice: ModeChoice, base: torch.nn.Module, config: BenchConfig,
                 params: int) -> None:
        self.choice = choice
        self.config = config
        self.result = RowResult(choice.label, choice.mode, choice.run, choice.baseline,
                                params=params)
        if choice.error:
            raise _RowError(choice.error)
        model = copy.deepcopy(base)
        if choice.lora:
            model = _add_lora(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        before = sum(p.numel() for p in trainable)
        opt = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.model, self.opt = wrap(model, opt, mode=choice.mode, **choice.options)
        after = sum(p.numel() for p in self.opt.precision.step_parameters())
        self.frozen = not choice.lora and after < before
        self.result.summary = self.opt.precision.summary

    def step(self, batch: torch.Tensor, index: int) -> None:
        config = self.config
        track = index == config.warmup - 1
        if track:
            start = StorageCounter()
            live = start.add(module_tensors(self.model.module))
            live += start.add(optimizer_tensors(self.opt.optimizer))
            live += start.add(self.opt.precision.step_parameters())
            tracker = PeakTracker(config.device)
            with tracker.track():
                loss = self._step(batch, measure=True)
            self.result.peak_bytes = live + tracker.transient
        else:
            _sync(config.device)
            began = time.perf_counter()
            loss = self._step(batch, measure=False)
            elapsed = time.perf_counter() - began
            if index >= config.warmup:
                self.result.step_ms_all.append(elapsed * 1e3)
        self.result.losses.append(loss)

    def _step(self, batch: torch.Tensor, measure: bool) -> float:
        loss = lm_loss(self.model(batch[:, :-1]), batch[:, 1:])
        self.opt.backward(loss)
        if measure:
            counter = StorageCounter()
            grads = [p.grad for p in self.model.module.parameters() if p.grad is not None]
            grads += [p.grad for p in self.opt.precision.step_parameters() if p.grad is not None]
            self.result.grad_bytes = counter.add(grads)
        if self.config.clip:
            self.opt.clip_grad_norm_(self.config.clip)
        self.opt.step()
        self.opt.zero_grad()
        return float(loss.detach())

    def finish(self, eval_data: torch.Tensor) -> None:
        """Final loss on the held-out batches, bytes of the state, skipped steps."""
        r = self.result
        if r.step_ms_all:
            r.step_ms = statistics.median(r.step_ms_all)
        counter = StorageCounter()
        r.weight_bytes = counter.add(module_tensors(self.model.module))
        r.optimizer_bytes = counter.add(optimizer_tensors(self.opt.optimizer))
        r.optimizer_bytes += counter.add(self.opt.precision.step_parameters())  # fp32 masters
        r.skipped_steps = self.opt.precision.skipped_steps
        self.model.eval()
        with torch.no_grad():
            losses = [float(lm_loss(self.model(b[:, :-1]), b[:, 1:])) for b in eval_data]
        self.model.train()
        r.final_loss = sum(losses) / len(losses)


class _RowError(Exception):
    pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peft_missing() -> MissingDependencyError:
    return MissingDependencyError(
        "This mode freezes quantized weights and is benchmarked as a LoRA fine-tune, which "
        "needs peft; install it: pip install 'mixprec[bench]'.", package="peft")


def _add_lora(model: torch.nn.Module, config: BenchConfig) -> torch.nn.Module:
    try:
        import peft
    except ImportError:
        raise _peft_missing() from None
    torch.manual_seed(config.seed + 4)  # the adapters start alike in every row
    lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                           lora_dropout=0.0, target_modules=lora_targets())
    return peft.get_peft_model(model, lora)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, (MixprecError, _RowError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


Progress = Callable[[str, int], Callable[[int], None]]


def _pretrain(base: torch.nn.Module, task: MarkovTask, config: BenchConfig,
              progress: Progress) -> torch.nn.Module:
    """The base of the LoRA runs: ``base`` trained in plain fp32 for a few steps."""
    model = copy.deepcopy(base)
    size = config.size
    data = task.batches(config.pretrain_steps, size.batch, size.seq, config.seed + 3)
    data = data.to(config.device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    advance = progress(f"pretraining the LoRA base ({config.pretrain_steps} steps, fp32)",
                       config.pretrain_steps)
    for batch in data:
        lm_loss(model(batch[:, :-1]), batch[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        advance(1)
    return model


def _build_rows(
    choices: list[ModeChoice], bases: Callable[[bool], torch.nn.Module], config: BenchConfig,
    params: int, left_out: list[tuple[str, str]],
) -> tuple[list[_Row], list[RowResult]]:
    rows: list[_Row] = []
    results: list[RowResult] = []
    for choice in choices:
        try:
            row = _Row(choice, bases(choice.lora), config, params)
            if row.frozen:  # a mode that freezes weights, not known by name: fine-tune it
                choice.lora = True
                row = _Row(choice, bases(True), config, params)
        except (UnsupportedDeviceError, MissingDependencyError) as exc:
            if choice.explicit or choice.baseline:
                results.append(RowResult(choice.label, choice.mode, choice.run, choice.baseline,
                                         status="error", error=str(exc), params=params))
            else:  # an installed mode this machine cannot run, not asked for by name
                left_out.append((choice.label, str(exc)))
            continue
        except Exception as exc:  # a row that cannot run is reported, the others go on
            failed = RowResult(choice.label, choice.mode, choice.run, choice.baseline,
                               status="error", error=_describe_error(exc), params=params)
            results.append(failed)
            continue
        rows.append(row)
        results.append(row.result)
    if any(r.run == "LoRA" for r in results) and not any(
            r.run == "LoRA" and r.baseline for r in results):  # a mode found freezing weights
        more = _build_rows([ModeChoice(BASELINE, BASELINE, lora=True, baseline=True)], bases,
                           config, params, left_out)
        rows += more[0]
        results += more[1]

    def order(r: RowResult) -> tuple[bool, bool]:  # full runs first, each kind's baseline first
        return r.run == "LoRA", not r.baseline

    rows.sort(key=lambda row: order(row.result))
    results.sort(key=order)
    return rows, results


def run_bench(choices: list[ModeChoice], config: BenchConfig, progress: Progress,
              left_out: list[tuple[str, str]] | None = None) -> BenchResult:
    """Train every row of ``choices`` interleaved and measure it."""
    size = config.size
    task = MarkovTask(size.vocab, config.seed)
    train_data = task.batches(config.steps, size.batch, size.seq, config.seed + 1)
    eval_data = task.batches(config.eval_batches, size.batch, size.seq, config.seed + 2)
    floor = task.floor(eval_data)
    train_data, eval_data = train_data.to(config.device), eval_data.to(config.device)

    torch.manual_seed(config.seed)
    with torch.device(config.device):
        base = BenchGPT(size)
    params = sum(p.numel() for p in base.parameters())
    pretrained: list[torch.nn.Module] = []

    def bases(lora: bool) -> torch.nn.Module:
        if not lora:
            return base
        if not peft_available():
            raise _peft_missing()
        if not pretrained:  # only when a LoRA row runs
            pretrained.append(_pretrain(base, task, config, progress))
        return pretrained[0]

    left_out = list(left_out or [])
    rows, results = _build_rows(choices, bases, config, params, left_out)
    interrupted_after = _train(rows, train_data, config, progress)
    for row in rows:
        if row.result.status == "ok":
            try:
                row.finish(eval_data)
            except KeyboardInterrupt:  # a Ctrl-C while finishing: report what is known, now
                if interrupted_after is None:
                    interrupted_after = config.steps
                break
            except Exception as exc:
                row.result.status, row.result.error = "error", _describe_error(exc)
    _compare(results)
    return BenchResult(config, results, left_out, floor, _notes(results, config),
                       interrupted_after=interrupted_after)


def _train(rows: list[_Row], train_data: torch.Tensor, config: BenchConfig,
           progress: Progress) -> int | None:
    """All rows, one step of each in turn; on a Ctrl-C, the steps every row completed
    (a row may have done one more), else None.

    Everything from the progress line on is inside the ``try``: a Ctrl-C sent once the
    line is printed always ends here, never in the caller's setup.
    """
    index = 0
    gc.collect()
    try:
        advance = progress(f"training {len(rows)} modes x {config.steps} steps, interleaved",
                           len(rows) * config.steps)
        gc.disable()  # a collection inside a timed step is noise, not the mode's cost
        for index in range(config.steps):
            batch = train_data[index]
            shift = index % max(1, len(rows))
            for row in rows[shift:] + rows[:shift]:
                if row.result.status == "ok":
                    try:
                        row.step(batch, index)
                    except Exception as exc:
                        row.result.status, row.result.error = "error", _describe_error(exc)
                advance(1)
    except KeyboardInterrupt:
        return min((row.result.steps for row in rows if row.result.status == "ok"),
                   default=index)
    finally:
        gc.enable()
    return None


def _compare(results: list[RowResult]) -> None:
    """Speed and loss gap of each row against the 32-true row of its kind."""
    for run in ("full", "LoRA"):
        base = next((r for r in results if r.baseline and r.run == run and r.status == "ok"),
                    None)
        if base is None:
            continue
        for r in results:
            if r.run != run or r.status != "ok":
                continue
            if r.step_ms and base.step_ms:
                r.speed = base.step_ms / r.step_ms
            if r.final_loss is not None and base.final_loss is not None:
                r.loss_gap = r.final_loss - base.final_loss
                r.loss_gap_pct = 100.0 * r.loss_gap / base.final_loss


def _notes(results: list[RowResult], config: BenchConfig) -> list[str]:
    notes: list[str] = []
    if any(r.run == "LoRA" for r in results):
        notes.append(
            f"LoRA rows: quantized weights are frozen, so these modes fine-tune LoRA adapters "
            f"(rank {config.lora_rank} on {', '.join(lora_targets())}) of a base pretrained for "
            f"{config.pretrain_steps} fp32 steps; speed and loss gap are against the 32-true "
            "LoRA row; B/param is per parameter of the base model.")
    fp16 = [r for r in results if r.mode.split("+")[0].startswith("16-") and r.speed]
    if config.device.type == "cpu" and fp16:
        speeds = ", ".join(f"{r.label} {r.speed:.2f}x" for r in fp16)
        notes.append(f"fp16 on a CPU ({speeds}): most CPUs have no fast fp16 matmul kernels, "
                     "so 16-* modes are no faster than fp32 here and often slower; judge them "
                     "against a plain torch loop (benchmarks/overhead.py), not against other "
                     "modes.")
    return notes


def summary_of(result: BenchResult) -> dict[str, Any]:
    """The run's configuration as plain values (for the JSON file)."""
    c = result.config
    return {"size": dataclasses.asdict(c.size) | {"description": c.size.describe()}, "steps": c.steps,
            "seed": c.seed, "device": str(c.device), "lr": c.lr, "clip": c.clip,
            "warmup": c.warmup, "pretrain_steps": c.pretrain_steps,
            "eval_batches": c.eval_batches, "lora_rank": c.lora_rank}
