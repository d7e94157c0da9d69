"""``mixprec bench``: the table, the JSON file, exact byte counts, determinism, failures."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec._bench import cli as bench_cli
from mixprec._bench.columns import COLUMNS, Column
from mixprec._bench.memory import PeakTracker, StorageCounter, module_tensors
from mixprec._bench.model import PRESETS, BenchGPT, MarkovTask, lora_targets, parse_size
from mixprec._bench.plan import parse_label, peft_available, plan, split_labels
from mixprec._bench.report import (
    plain_table,
    plot_available,
    print_report,
    progress_bars,
    to_json,
)
from mixprec._bench.run import BenchConfig, BenchResult, RowResult, run_bench
from mixprec._cli import main
from mixprec.exceptions import UnsupportedDeviceError

TINY = PRESETS["tiny"]
N = sum(p.numel() for p in BenchGPT(TINY).parameters())  # parameters of the tiny model
P = len(list(BenchGPT(TINY).parameters()))  # parameter tensors (AdamW keeps a 4-byte step each)


def _bench(tmp_path, *args: str) -> tuple[int, dict]:
    path = tmp_path / "bench.json"
    code = main(["bench", "--size", "tiny", "--quiet", "--json", str(path), *args])
    return code, json.loads(path.read_text())


def _row(data: dict, mode: str, run: str = "full") -> dict:
    return next(r for r in data["rows"] if r["mode"] == mode and r["run"] == run)


# -- a real mode that freezes quantized weights (no bitsandbytes in the core tests) -------


class _Int8Linear(nn.Module):
    """int8 weights with a per-row fp32 scale, frozen; the bias is kept, frozen."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.float() * self.scale, self.bias)


class FrozenInt8(mixprec.PrecisionMode):
    """Quantizes every Linear except LoRA adapters to frozen int8."""

    def convert_module(self, module: nn.Module) -> list[str]:
        names = [n for n, m in module.named_modules()
                 if isinstance(m, nn.Linear) and "lora_" not in n]
        for name in names:
            parent, _, attr = name.rpartition(".")
            owner = module.get_submodule(parent) if parent else module
            setattr(owner, attr, _Int8Linear(getattr(owner, attr)))
        return [f"{len(names)} Linear layers -> frozen int8"]


class CudaOnly(mixprec.PrecisionMode):
    def validate(self, module: nn.Module, device: torch.device) -> None:
        if device.type != "cuda":
            raise UnsupportedDeviceError(
                "Mode 'cuda-only' needs a CUDA device, but the model is on 'cpu'; "
                "use bf16-mixed on a CPU.", device=device)


class _TestModes:
    @mixprec.hookimpl
    def mixprec_modes(self) -> list[mixprec.ModeSpec]:
        return [mixprec.ModeSpec("int8", FrozenInt8, "frozen int8 (test)", api_version=2,
                                 tags={"frozen-weights"}),
                mixprec.ModeSpec("frozen-int8", FrozenInt8, "frozen int8, unknown name (test)"),
                mixprec.ModeSpec("cuda-only", CudaOnly, "needs CUDA (test)", requires="CUDA")]


@pytest.fixture
def test_modes(fresh_registry):
    fresh_registry.register(_TestModes(), name="bench-test-modes")
    yield fresh_registry
    fresh_registry.unregister("bench-test-modes")


# -- the model and the task ----------------------------------------------------------------


def test_the_task_has_an_exact_floor_that_a_trained_model_approaches():
    task = MarkovTask(vocab=16, seed=0)
    data = task.batches(2, 64, 16, seed=1)
    floor = task.floor(data)
    assert 0.5 < floor < math.log(16)
    # the floor is the true source's loss: scoring the data with the true
    # conditional probabilities gives it back up to sampling noise
    tokens = data.reshape(-1, 17)
    p = task.dense[tokens[:, 1:-1], tokens[:, :-2] % 2].gather(2, tokens[:, 2:, None])
    assert float(-p.log().mean()) == pytest.approx(floor, rel=0.05)
    # same seed, same data; another seed, other data
    assert torch.equal(task.batches(1, 4, 8, seed=3), MarkovTask(16, 0).batches(1, 4, 8, seed=3))
    assert not torch.equal(task.batches(1, 4, 8, seed=3), task.batches(1, 4, 8, seed=4))


def test_size_presets_and_explicit_dims():
    assert parse_size("tiny") == TINY
    assert parse_size("tiny,layers=2,tied=true") == TINY.__class__(
        **{**vars(TINY), "layers": 2, "tied": True})
    assert parse_size("dim=96,heads=4").dim == 96
    for bad, words in [("huge", "neither a preset"), ("dim=x", "whole number"),
                       ("dim=30,heads=4", "not a multiple"), ("layers=0", "at least 1")]:
        with pytest.raises(ValueError, match=words):
            parse_size(bad)
    tied = BenchGPT(parse_size("tiny,tied=true"))
    assert tied.head.weight is tied.tok.weight


def test_mode_labels_carry_options_and_classify_frozen_modes(test_modes):
    assert split_labels("a,b[x=1,y=2]+c, d") == ["a", "b[x=1,y=2]+c", "d"]
    choice = parse_label("bf16-true[master_weights=True]+adamw8bit")
    assert (choice.mode, choice.options, choice.lora) == (
        "bf16-true+adamw8bit", {"master_weights": True}, False)
    # frozen weights are read from the mode's tags, not its name: int8 declares
    # frozen-weights, frozen-int8 declares nothing (it is found freezing at wrap), and of a
    # mode that is not installed nothing is known
    assert parse_label("int8").lora and parse_label("int8+adamw-any").lora
    assert not parse_label("frozen-int8").lora
    assert not parse_label("nf4-dq+paged-adamw8bit").lora
    assert not parse_label("int8-training").lora
    assert "not key=value" in parse_label("bf16-true[oops]").error


# -- the table and the JSON file -------------------------------------------------------------


def test_core_modes_table_json_and_exact_bytes(fresh_registry, tmp_path, capsys):
    code, data = _bench(tmp_path, "--steps", "4", "--modes",
                        "bf16-true,bf16-true[master_weights=True],16-true,64-true,bf16-mixed")
    assert code == 0
    out = capsys.readouterr().out
    for word in ("step ms", "speed", "weights B/p", "grads B/p", "optim B/p", "state MiB",
                 "peak MiB", "loss", "vs 32-true", "skipped", "tracked tensors",
                 "best possible loss"):
        assert word in out
    assert [r["mode"] for r in data["rows"]] == [
        "32-true", "bf16-true", "bf16-true[master_weights=True]", "16-true", "64-true",
        "bf16-mixed"]  # the baseline first, then the order asked for
    expected = {  # (weights, grads, optimizer) bytes, counted from the tensors
        "32-true": (4 * N, 4 * N, 8 * N + 4 * P),
        "bf16-true": (2 * N, 2 * N, 4 * N + 4 * P),
        "bf16-true[master_weights=True]": (2 * N, 4 * N, 12 * N + 4 * P),  # fp32 masters
        "16-true": (2 * N, 2 * N, 8 * N + 4 * P),  # fp32 optimizer state
        "64-true": (8 * N, 8 * N, 16 * N + 4 * P),
        "bf16-mixed": (4 * N, 4 * N, 8 * N + 4 * P),
    }
    for mode, (w, g, o) in expected.items():
        row = _row(data, mode)
        assert row["status"] == "ok" and row["params"] == N
        assert (row["bytes"]["weights"], row["bytes"]["grads"], row["bytes"]["optimizer"]) \
            == (w, g, o), mode
        assert row["bytes"]["state"] == w + g + o
        assert row["state_mib"] == pytest.approx((w + g + o) / 2**20)
        # the step's peak holds the state and at least the activations on top of it
        assert row["bytes"]["peak"] > w + g + o
        assert len(row["losses"]) == 4 and len(row["step_ms_all"]) == 2
        assert row["step_ms"] == pytest.approx(sum(row["step_ms_all"]) / 2)  # the median of 2
        assert row["skipped_steps"] == 0
    assert _row(data, "32-true")["bytes_per_param"] == {
        "weights": 4.0, "grads": 4.0, "optimizer": 8 + 4 * P / N}
    assert _row(data, "bf16-true")["bytes_per_param"]["weights"] == 2.0
    base = _row(data, "32-true")
    assert base["baseline"] and base["speed"] == 1.0 and base["loss_gap"] == 0.0
    bf16 = _row(data, "bf16-true")
    assert bf16["speed"] == pytest.approx(base["step_ms"] / bf16["step_ms"])
    assert bf16["loss_gap"] == pytest.approx(bf16["final_loss"] - base["final_loss"])
    assert data["task"]["loss_floor"] < base["final_loss"] < data["task"]["uniform_loss"] + 0.1
    assert data["config"]["steps"] == 4 and data["config"]["size"]["dim"] == TINY.dim
    assert "tracked tensors" in data["memory_method"]


def test_fp16_loss_scaling_skips_are_counted(fresh_registry, tmp_path):
    # a loss scale of 1e12 overflows fp16 gradients, and halving it six times does not help
    mode = "16-mixed[init_scale=1e12,max_scale=1e12]"
    code, data = _bench(tmp_path, "--steps", "6", "--modes", mode)
    assert code == 0
    row = _row(data, mode)
    assert row["status"] == "ok" and row["skipped_steps"] == 6
    assert _row(data, "32-true")["skipped_steps"] == 0
    assert all(math.isfinite(x) for x in row["losses"])
    # nothing was stepped: the model still predicts no better than at the start
    assert row["final_loss"] > _row(data, "32-true")["final_loss"]


def test_same_seed_same_losses_other_seed_other_losses(fresh_registry):
    def losses(seed: int) -> dict[str, list[float]]:
        choices, _ = plan("bf16-mixed,16-true", torch.device("cpu"))
        config = BenchConfig(size=TINY, steps=4, seed=seed, device=torch.device("cpu"))
        result = run_bench(choices, config, lambda description, total: lambda n: None)
        return {r.label: [*r.losses, r.final_loss] for r in result.rows}

    first = losses(0)
    assert first == losses(0)  # exact: same model, data and order of operations
    assert first["32-true"] != losses(1)["32-true"]
    assert set(first) == {"32-true", "bf16-mixed", "16-true"}


# -- failures --------------------------------------------------------------------------------


def test_a_mode_that_cannot_run_fails_the_exit_code_while_others_report(
        test_modes, tmp_path, capsys):
    code, data = _bench(tmp_path, "--steps", "3", "--modes", "bf16-mixed,nf5,cuda-only")
    assert code == 1
    captured = capsys.readouterr()
    assert "could not run here: nf5 (full), cuda-only (full)" in captured.err
    assert "FAILED: nf5 (full): Unknown precision mode 'nf5'" in captured.out
    assert "FAILED: cuda-only (full): Mode 'cuda-only' needs a CUDA device" in captured.out
    assert _row(data, "bf16-mixed")["status"] == "ok"
    assert _row(data, "bf16-mixed")["final_loss"] > 0
    failed = _row(data, "nf5")
    assert failed["status"] == "error" and "Available:" in failed["error"]
    # a first-party mode that is not installed names the distribution to install
    code, data = _bench(tmp_path, "--steps", "3", "--modes", "nf4-dq")
    # (not installed, so nothing says it freezes weights: a full row)
    assert code == 1 and "pip install mixprec-bnb" in _row(data, "nf4-dq")["error"]


def test_default_run_leaves_out_what_this_device_cannot_run(test_modes, tmp_path, capsys):
    code, data = _bench(tmp_path, "--steps", "3")
    assert code == 0
    modes = [r["mode"] for r in data["rows"]]
    assert modes[:7] == ["32-true", "bf16-mixed", "bf16-true", "bf16-true[master_weights=True]",
                         "16-mixed", "16-true", "64-true"]
    assert "cuda-only" not in modes
    assert {"mode": "cuda-only", "reason": "Mode 'cuda-only' needs a CUDA device, but the "
            "model is on 'cpu'; use bf16-mixed on a CPU."} in data["not_run"]
    assert "not run: cuda-only: Mode 'cuda-only' needs a CUDA device" in capsys.readouterr().out


def test_bad_arguments_exit_2_with_the_fix(fresh_registry, capsys):
    assert main(["bench", "--size", "huge"]) == 2
    assert "neither a preset (tiny, small, medium)" in capsys.readouterr().err
    assert main(["bench", "--steps", "2"]) == 2
    assert "use at least 3" in capsys.readouterr().err
    assert main(["bench", "--device", "nonsense"]) == 2
    assert "use cpu or cuda" in capsys.readouterr().err


# -- the plan decides by tags, never by mode names ---------------------------------------------


class _Unchanged(mixprec.PrecisionMode):
    """Trains as 32-true on any device: only its tags can keep it out of a default run."""


class _UnchangedOptimizer(mixprec.OptimizerMode):
    pass


class _TaggedModes:
    @mixprec.hookimpl
    def mixprec_modes(self) -> list[mixprec.ModeSpec]:
        return [
            mixprec.ModeSpec("quant-x", FrozenInt8, "frozen int8 (test)", api_version=2,
                             tags={"frozen-weights"}),
            mixprec.ModeSpec("slow-x", _Unchanged, "slow on a CPU (test)", api_version=2,
                             tags={"slow-on-cpu"}),
            mixprec.ModeSpec("gpu-x", _Unchanged, "needs CUDA (test)", api_version=2,
                             requires="CUDA, sm90", tags={"cuda-only"}),
            mixprec.ModeSpec("gpu-opt", _UnchangedOptimizer, "needs CUDA (test)",
                             kind="optimizer", requires="CUDA", api_version=2,
                             tags={"cuda-only"}),
        ]


@pytest.fixture
def tagged_modes(fresh_registry):
    fresh_registry.register(_TaggedModes(), name="bench-tagged-modes")
    yield fresh_registry
    fresh_registry.unregister("bench-tagged-modes")


def test_default_run_leaves_out_modes_by_their_tags(tagged_modes):
    cpu = torch.device("cpu")
    rows, left_out = plan(None, cpu)
    reasons = dict(left_out)
    if peft_available():
        assert [(c.label, c.run) for c in rows][-2:] == [("32-true", "LoRA"), ("quant-x", "LoRA")]
    else:  # tagged frozen-weights: a LoRA run, which needs peft
        assert "needs peft" in reasons.pop("quant-x")
    assert {"slow-x", "gpu-x", "32-true+gpu-opt"} == set(reasons)
    assert reasons["slow-x"] == (
        "on a CPU, FP8 matmuls run through torch._scaled_mm's slow reference path; left out of "
        "the default run to keep it short: name it in --modes to run it")
    for label in ("gpu-x", "32-true+gpu-opt"):  # left out without trying wrap (it would work)
        assert reasons[label].startswith("needs a CUDA GPU")
    assert reasons["gpu-x"].startswith("needs a CUDA GPU (CUDA, sm90), and ")
    if not torch.cuda.is_available():
        assert reasons["gpu-x"].endswith(
            "torch finds no CUDA device here: run the bench on a machine with one")
    else:
        assert reasons["gpu-x"].endswith("the bench runs on cpu: use --device cuda")
    # named in --modes, every mode is attempted
    rows, left_out = plan("gpu-x,slow-x,32-true+gpu-opt,quant-x", cpu)
    assert left_out == [] and [(c.label, c.run) for c in rows] == [
        ("32-true", "full"), ("gpu-x", "full"), ("slow-x", "full"), ("32-true+gpu-opt", "full"),
        ("32-true", "LoRA"), ("quant-x", "LoRA")]


def test_modes_named_in_modes_run_whatever_their_tags(tagged_modes, tmp_path):
    code, data = _bench(tmp_path, "--steps", "3", "--modes", "gpu-x,slow-x")
    assert code == 0 and data["not_run"] == []
    assert [(r["mode"], r["status"]) for r in data["rows"]] == [
        ("32-true", "ok"), ("gpu-x", "ok"), ("slow-x", "ok")]


def test_labels_follow_the_mode_string_grammar(tagged_modes, tmp_path, capsys):
    choice = parse_label("bf16-true[master_weights=true]+gpu-opt")
    assert (choice.mode, choice.options, choice.tags) == (
        "bf16-true+gpu-opt", {"master_weights": True}, frozenset({"cuda-only"}))
    assert parse_label("32-true+gpu-opt[lr_scale=2]").mode == "32-true+gpu-opt[lr_scale=2]"
    # a label that breaks the grammar is a failed row with the reason, not a crash
    code, data = _bench(tmp_path, "--steps", "3", "--modes", "bf16-mixed,Bf16-true,bf16-true[oops]")
    assert code == 1
    assert _row(data, "bf16-mixed")["status"] == "ok"
    assert "write lower-case mode names" in _row(data, "Bf16-true")["error"]
    assert "'oops' is not key=value" in _row(data, "bf16-true[oops]")["error"]
    assert "FAILED: Bf16-true (full): Mode string 'Bf16-true' has the part" in (
        capsys.readouterr().out)


# -- frozen quantized weights: LoRA fine-tunes -------------------------------------------------


def _int8_lora_weight_bytes() -> int:
    model = BenchGPT(TINY)
    total, rank = 0, 8
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            total += m.out_features * m.in_features  # int8 weight
            total += 4 * m.out_features * (2 if m.bias is not None else 1)  # fp32 scale, bias
            if name.rpartition(".")[2] in lora_targets():
                total += 4 * rank * (m.in_features + m.out_features)  # fp32 LoRA A and B
        elif isinstance(m, (nn.Embedding, nn.LayerNorm)):
            total += 4 * sum(p.numel() for p in m.parameters())
    return total


def test_frozen_weight_modes_run_as_lora_fine_tunes(test_modes, tmp_path, capsys):
    pytest.importorskip("peft")
    code, data = _bench(tmp_path, "--steps", "4", "--modes", "bf16-mixed,int8,frozen-int8")
    assert code == 0
    out = capsys.readouterr().out
    assert "LoRA rows: quantized weights are frozen" in out
    rows = [(r["mode"], r["run"]) for r in data["rows"]]
    assert rows[:3] == [("32-true", "full"), ("bf16-mixed", "full"), ("32-true", "LoRA")]
    # int8 is known by its tag; frozen-int8 is found freezing the weights at wrap
    assert sorted(rows[3:]) == [("frozen-int8", "LoRA"), ("int8", "LoRA")]
    lora_params = sum(rank_in_out for rank_in_out in (
        8 * (m.in_features + m.out_features) for n, m in BenchGPT(TINY).named_modules()
        if isinstance(m, nn.Linear) and n.rpartition(".")[2] in lora_targets()))
    for mode in ("int8", "frozen-int8"):
        row = _row(data, mode, "LoRA")
        assert row["status"] == "ok" and row["params"] == N
        assert row["bytes"]["weights"] == _int8_lora_weight_bytes()
        assert row["bytes"]["grads"] == 4 * lora_params  # only the adapters train
        assert row["bytes"]["optimizer"] == 8 * lora_params + 4 * 2 * 4 * TINY.layers
    ref = _row(data, "32-true", "LoRA")
    assert ref["baseline"] and ref["bytes"]["grads"] == 4 * lora_params
    assert ref["bytes"]["weights"] == 4 * (N + lora_params)
    assert _row(data, "int8", "LoRA")["speed"] == pytest.approx(
        ref["step_ms"] / _row(data, "int8", "LoRA")["step_ms"])
    # both int8 rows ran the same fine-tune
    assert _row(data, "int8", "LoRA")["losses"] == _row(data, "frozen-int8", "LoRA")["losses"]


# -- memory accounting -------------------------------------------------------------------------


def test_cpu_peak_tracking_counts_exact_tensor_bytes():
    tracker = PeakTracker(torch.device("cpu"))
    keep = torch.zeros(1000)
    with tracker.track():
        big = torch.empty(2**20, dtype=torch.uint8)
        del big
        small = torch.empty(2**18, dtype=torch.uint8)
        del keep  # freeing a tensor from before the block does not lower the count
    assert tracker.transient == 2**20
    assert small.numel() == 2**18


def test_storages_are_counted_once():
    model = BenchGPT(parse_size("tiny,tied=true"))
    counter = StorageCounter()
    weights = counter.add(module_tensors(model))
    assert weights == 4 * sum(p.numel() for p in model.parameters())  # the tied matrix once
    assert counter.add([model.head.weight, model.tok.weight[:2]]) == 0


# -- output ----------------------------------------------------------------------------------


def test_rich_table_on_a_terminal_and_plain_text_elsewhere(fresh_registry):
    pytest.importorskip("rich")
    choices, _ = plan("bf16-true[master_weights=True]", torch.device("cpu"))
    config = BenchConfig(size=TINY, steps=3, seed=0, device=torch.device("cpu"))
    result = run_bench(choices, config, lambda description, total: lambda n: None)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term, pipe = Terminal(), io.StringIO()
    print_report(result, term)
    print_report(result, pipe)
    assert pipe.getvalue().strip() == plain_table(result).strip()
    shown = term.getvalue()
    assert shown != pipe.getvalue()
    # an 80-column terminal does not squeeze the table; option brackets are not markup
    assert "bf16-true[master_weights=True]" in shown and "32-true" in shown
    assert "weights" in shown and "B/p" in shown


def test_progress_without_rich_is_plain_lines(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich.progress", None)  # as if rich were not installed
    with progress_bars(quiet=False) as start:
        advance = start("training 2 modes", 4)
        for _ in range(4):
            advance(1)
    err = capsys.readouterr().err
    assert err.splitlines() == ["training 2 modes ...", "  20% (1/4)", "  50% (2/4)",
                                "  70% (3/4)", "  100% (4/4)"]


def test_plot_draws_a_png(fresh_registry, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert main(["bench", "--size", "tiny", "--steps", "3", "--quiet", "--modes", "bf16-mixed",
                 "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# -- the columns, as data ----------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_column_headers() -> list[str]:
    """The first cells of the column table in the README's ``mixprec bench`` section;
    a grouped row (``weights / grads / optim B/p``) stands for one header per name, each
    with the unit after the last name."""
    section = README.read_text().split("## Run it: `mixprec bench`", 1)[1].split("\n## ", 1)[0]
    table = section.split("| column | meaning |", 1)[1].split("\n\n", 1)[0]
    headers = []
    for line in table.strip().splitlines()[1:]:  # after the |---| line
        names = [n.strip() for n in line.split("|")[1].split(" / ")]
        last, _, unit = names[-1].partition(" ") if len(names) > 1 else (names[-1], "", "")
        headers += [f"{n} {unit}".strip() for n in [*names[:-1], last]]
    return headers


def test_the_readme_column_table_lists_exactly_the_columns():
    assert _readme_column_headers() == [c.header for c in COLUMNS], (
        "README.md's column table (section 'Run it: `mixprec bench`') and "
        "mixprec/_bench/columns.py's COLUMNS differ; give every Column one row there, in order")
    assert len({c.key for c in COLUMNS}) == len({c.json for c in COLUMNS}) == len(COLUMNS)


def test_a_new_column_is_one_entry_in_the_list():
    ok = RowResult("bf16-true", "bf16-true", "full", False, params=10, step_ms=12.0, speed=0.5,
                   weight_bytes=20, grad_bytes=20, optimizer_bytes=40, final_loss=2.0,
                   loss_gap=0.1, loss_gap_pct=5.0, summary="bf16-true: 3 tensors")
    failed = RowResult("nf5", "nf5", "full", False, status="error", error="Unknown mode", params=10)
    result = BenchResult(BenchConfig(size=TINY, steps=3, seed=0, device=torch.device("cpu")),
                         [ok, failed], [], 1.0, [])
    extra = Column("tensors", "summary len", "length of the summary line (test)",
                   lambda r: len(r.summary), json="summary_len")
    COLUMNS.append(extra)
    try:
        lines = plain_table(result).splitlines()
        header = next(line for line in lines if line.startswith("mode "))
        assert header.endswith("skipped  summary len")
        assert next(line for line in lines if line.startswith("bf16-true")).endswith("  20")
        assert next(line for line in lines if line.startswith("nf5")).endswith("failed")
        data = to_json(result)
        assert data["columns"]["tensors"] == "length of the summary line (test)"
        assert [r["summary_len"] for r in data["rows"]] == [20, 0]
    finally:
        COLUMNS.remove(extra)
    assert "summary len" not in plain_table(result)
    assert list(to_json(result)["columns"]) == [
        "mode", "run", "step ms", "speed", "weights", "grads", "optim", "state MiB", "peak MiB",
        "loss", "vs 32-true", "skipped"]


# -- what comes from outside is checked before anything trains ---------------------------------


def _no_training(monkeypatch) -> None:
    """Make any training fail the test: the checks must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the bench trained before refusing its arguments")

    monkeypatch.setattr(bench_cli, "run_bench", forbidden)


def _one_line_usage_error(capsys, *args: str) -> str:
    assert main(["bench", "--size", "tiny", "--steps", "3", "--quiet", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("mixprec bench: ")
    return captured.err


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_output_paths_are_checked_before_training(fresh_registry, monkeypatch, tmp_path, capsys,
                                                  flag):
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    _no_training(monkeypatch)
    name = "out.json" if flag == "--json" else "out.png"
    missing = tmp_path / "no-such-dir" / name
    err = _one_line_usage_error(capsys, flag, str(missing))
    assert f"{flag} {missing}: the directory {missing.parent} does not exist; create it" in err
    err = _one_line_usage_error(capsys, flag, str(tmp_path))
    assert f"{flag} {tmp_path}: is a directory; give a file name in it." in err
    a_file = tmp_path / "file.txt"
    a_file.write_text("kept\n")
    err = _one_line_usage_error(capsys, flag, str(a_file / name))
    assert f"{a_file} is not a directory" in err
    assert a_file.read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # no file left behind


def _unwritable_dir(tmp_path, where: str) -> Path:
    if where == "sysfs":  # root may write anywhere the mode bits forbid, but not here
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no sysfs on this system")
        return Path("/sys")
    if os.geteuid() == 0:
        pytest.skip("root writes in a directory without write permission")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked


@pytest.mark.parametrize("where", ["mode bits", "sysfs"])
def test_an_unwritable_output_is_refused_before_training(fresh_registry, monkeypatch, tmp_path,
                                                         capsys, where):
    _no_training(monkeypatch)
    path = _unwritable_dir(tmp_path, where) / "bench.json"
    err = _one_line_usage_error(capsys, "--json", str(path))
    assert f"--json {path}: cannot be written (Permission denied); choose a writable" in err
    if plot_available():
        err = _one_line_usage_error(capsys, "--plot", str(path.with_suffix(".png")))
        assert "cannot be written (Permission denied)" in err


def test_an_existing_output_file_is_left_as_it_was_by_the_check(fresh_registry, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text("old\n")
    assert bench_cli.unwritable(str(path)) is None
    assert path.read_text() == "old\n"
    assert bench_cli.unwritable(str(tmp_path / "new.json")) is None
    assert not (tmp_path / "new.json").exists()


def test_plot_format_and_matplotlib_are_checked_before_training(fresh_registry, monkeypatch,
                                                                tmp_path, capsys):
    _no_training(monkeypatch)
    if plot_available():
        err = _one_line_usage_error(capsys, "--plot", str(tmp_path / "curves.txt"))
        assert "matplotlib cannot write .txt files; give a name ending in .png" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    err = _one_line_usage_error(capsys, "--plot", str(tmp_path / "curves.png"))
    assert "--plot needs matplotlib; install it: pip install 'mixprec[bench]'." in err


@pytest.mark.parametrize("modes", ["", " , ,", "  "])
def test_an_empty_modes_list_is_a_usage_error(fresh_registry, monkeypatch, capsys, modes):
    _no_training(monkeypatch)
    err = _one_line_usage_error(capsys, "--modes", modes)
    assert f"--modes {modes!r} names no mode; name one or more of the installed modes (" in err
    for mode in ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true"):
        assert mode in err


# -- Ctrl-C: the steps done so far, reported ---------------------------------------------------


def _main_130(*args: str) -> int:
    """``main`` with the bench's arguments; a KeyboardInterrupt that escapes fails the test
    (instead of ending the test session)."""
    try:
        return main(["bench", "--size", "tiny", "--quiet", *args])
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt escaped mixprec bench")


def test_ctrl_c_during_training_prints_the_partial_table_and_json(fresh_registry, monkeypatch,
                                                                  tmp_path, capsys):
    @contextlib.contextmanager
    def ctrl_c_after_nine_row_steps(quiet):
        done = []

        def start(description, total):
            def advance(n):
                done.append(n)
                if len(done) == 9:
                    raise KeyboardInterrupt
            return advance

        yield start

    monkeypatch.setattr(bench_cli, "progress_bars", ctrl_c_after_nine_row_steps)
    path = tmp_path / "bench.json"
    assert _main_130("--steps", "10", "--modes", "bf16-mixed", "--json", str(path)) == 130
    captured = capsys.readouterr()
    # rounds 0-3 done by both rows (4 steps each); in round 4, 32-true (first) did its 5th
    assert ("partial: interrupted after 4 of 10 steps; each row is computed from the steps "
            "its mode completed") in captured.out
    assert captured.err == ("mixprec bench: interrupted after 4 of 10 steps; the table above "
                            "is partial, as is the file written.\n")
    base = next(line for line in captured.out.splitlines() if line.startswith("32-true "))
    assert " 1.00x " in base and "baseline" in base
    data = json.loads(path.read_text())
    assert data["partial"] is True and data["steps_done"] == 4 and data["config"]["steps"] == 10
    assert [(r["mode"], r["steps"], len(r["losses"])) for r in data["rows"]] == [
        ("32-true", 5, 5), ("bf16-mixed", 4, 4)]
    for row in data["rows"]:  # numbers from the steps done: warm-up 2, then timed steps
        assert row["status"] == "ok" and row["final_loss"] > 0
        assert len(row["step_ms_all"]) == row["steps"] - 2 and row["step_ms"] > 0
        assert row["bytes"]["grads"] == 4 * N and row["bytes"]["peak"] > 0
    assert _row(data, "bf16-mixed")["speed"] > 0


def test_a_complete_run_is_not_partial(fresh_registry, tmp_path, capsys):
    code, data = _bench(tmp_path, "--steps", "3", "--modes", "32-true")
    assert code == 0 and data["partial"] is False and data["steps_done"] == 3
    assert data["rows"][0]["steps"] == 3
    assert "partial" not in capsys.readouterr().out


class _StopInForward(mixprec.PrecisionMode):
    """Raises KeyboardInterrupt in its first training forward: a Ctrl-C in mid-step,
    before any row reached its memory-tracked step."""

    def convert_module(self, module: nn.Module) -> list[str]:
        self.module = module
        return []

    def forward_context(self):
        if self.module.training:
            raise KeyboardInterrupt
        return contextlib.nullcontext()


class _StopInWrap(mixprec.PrecisionMode):
    """Raises KeyboardInterrupt while the bench sets its row up, before any training."""

    def convert_module(self, module: nn.Module) -> list[str]:
        raise KeyboardInterrupt


class _StopModes:
    @mixprec.hookimpl
    def mixprec_modes(self) -> list[mixprec.ModeSpec]:
        return [mixprec.ModeSpec("stop-in-forward", _StopInForward, "Ctrl-C mid-step (test)"),
                mixprec.ModeSpec("stop-in-wrap", _StopInWrap, "Ctrl-C at wrap (test)")]


@pytest.fixture
def stop_modes(fresh_registry):
    fresh_registry.register(_StopModes(), name="bench-stop-modes")
    yield fresh_registry
    fresh_registry.unregister("bench-stop-modes")


def test_ctrl_c_in_mid_step_before_anything_was_measured(stop_modes, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert _main_130("--steps", "10", "--modes", "stop-in-forward", "--json", str(path)) == 130
    out = capsys.readouterr().out
    assert "partial: interrupted after 0 of 10 steps" in out
    data = json.loads(path.read_text())
    assert data["partial"] is True and data["steps_done"] == 0
    assert [(r["mode"], r["steps"]) for r in data["rows"]] == [
        ("32-true", 1), ("stop-in-forward", 0)]
    for row in data["rows"]:  # no timed step, no tracked step: unknown, not zero
        assert row["step_ms"] is None and row["speed"] is None
        assert row["bytes"]["grads"] is row["bytes"]["state"] is row["bytes"]["peak"] is None
        assert row["bytes_per_param"]["grads"] is None and row["state_mib"] is None
        assert row["bytes_per_param"]["weights"] == 4.0 and row["final_loss"] > 0
    header = next(line for line in out.splitlines() if line.startswith("mode "))
    base = next(line for line in out.splitlines() if line.startswith("32-true "))
    grads = header.index("grads B/p")  # the cell under it is blank
    assert base[grads:grads + len("grads B/p")].strip() == ""


def test_ctrl_c_before_training_says_nothing_was_measured(stop_modes, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert _main_130("--steps", "5", "--modes", "stop-in-wrap", "--json", str(path)) == 130
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("mixprec bench: interrupted before the first training step; "
                            "nothing was measured, nothing written.\n")
    assert not path.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process: POSIX")
def test_sigint_to_a_real_bench_process(tmp_path):
    path = tmp_path / "bench.json"
    env = {**os.environ, "MIXPREC_LOAD_PLUGINS": ""}
    # A child inherits an ignored SIGINT (a shell's background job): restore the default,
    # so that Python turns SIGINT into KeyboardInterrupt as it does at a terminal.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixprec._cli", "bench", "--size", "tiny", "--steps", "400",
         "--modes", "32-true", "--json", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # progress lines go to stderr (not a terminal: plain)
            seen.append(line)
            if line.strip().startswith("10% ("):  # 40 of 400 steps done, 360 to go
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)  # guards against a hang only
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = "".join(seen) + err
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err
    assert "partial: interrupted after " in out and " of 400 steps;" in out
    assert "\n32-true " in out
    data = json.loads(path.read_text())
    assert data["partial"] is True and 40 <= data["steps_done"] < 400
    assert data["rows"][0]["steps"] == data["steps_done"]
    assert "mixprec bench: interrupted after " in err
