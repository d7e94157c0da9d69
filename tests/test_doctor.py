"""mixprec.doctor: per-layer SQNR equal to a direct computation, fp16 overflow found and
avoided, bf16 updates lost to rounding found and fixed by master weights, plugin modes
examined like core ones, the user's model left alone, the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import TinyNet, make_batch

import mixprec
import mixprec.utils
from mixprec._bench.model import PRESETS, BenchGPT, MarkovTask, lm_loss
from mixprec._cli import main
from mixprec._doctor.measure import LayerReference
from mixprec._doctor.run import default_modes
from mixprec._doctor.sqnr import LostUpdates, PowerSum, sqnr_db, underflow_counts


def _loss(model, batch):
    tokens, targets = batch
    return torch.nn.functional.cross_entropy(model(tokens).float().flatten(0, 1),
                                             targets.flatten())


def _batches(n: int = 4):
    return [make_batch(seed=i) for i in range(n)]


def _direct_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.detach().double(), test.detach().double()
    return 10 * math.log10(float((ref**2).sum()) / float(((ref - test) ** 2).sum()))


# -- the numbers ------------------------------------------------------------------------


def test_sqnr_of_known_tensors():
    ref = torch.tensor([1.0, 1.0, -2.0])
    test = torch.tensor([1.1, 0.9, -2.0])
    assert sqnr_db(ref, test) == pytest.approx(10 * math.log10(6.0 / 0.02))
    assert sqnr_db(ref, ref) == math.inf
    assert math.isnan(sqnr_db(ref, torch.tensor([1.0, math.inf, 0.0])))
    power = PowerSum()  # over batches, the powers add before the ratio
    power.add(torch.ones(4), torch.full((4,), 1.1))
    power.add(torch.full((4,), 10.0), torch.full((4,), 10.1))
    assert power.db == pytest.approx(10 * math.log10((4 + 400) / (0.04 + 0.04)))


def test_underflow_and_lost_update_counts():
    grads = [torch.tensor([2.0**-30, 2.0**-20, 0.0, 1.0])]
    assert underflow_counts(grads, scale=1.0) == (1, 3)      # 2**-30 flushes to 0 in fp16
    assert underflow_counts(grads, scale=2.0**16) == (0, 3)  # scaled by 2**16 it survives
    assert torch.tensor(2.0**-30).half().item() == 0.0 and torch.tensor(2.0**-14).half() > 0
    # the doctor's exponent histogram gives the same shares at any power-of-two scale
    torch.manual_seed(0)
    random = [torch.randn(1000) * 10.0 ** torch.randint(-12, 0, (1000,)) for _ in range(2)]
    layer = LayerReference("Linear", 0)
    layer.add_grads(random)
    for scale in (1.0, 2.0**10, 2.0**16, 2.0**24):
        flushed, nonzero = underflow_counts(random, scale)
        assert layer.underflow_share(scale) == pytest.approx(flushed / nonzero)
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0], dtype=torch.bfloat16))
    w.grad = torch.tensor([1.0, 1.0, 0.0], dtype=torch.bfloat16)
    lost = LostUpdates()
    lost.before([("w", w)])
    with torch.no_grad():  # an update under half an ulp of 1.0 in bf16 (2**-8) rounds away
        w.add_(torch.tensor([1e-3, 1e-1, 1e-1]).to(torch.bfloat16))
    assert lost.after() == {"w": (1, 2)}  # of the two elements with a gradient, one kept 1.0
    assert lost.share("w") == 0.5


def test_sqnr_values_equal_a_direct_computation():
    torch.manual_seed(0)
    model = TinyNet()
    batches = _batches(2)
    report = mixprec.doctor(model, batches, loss_fn=_loss, modes=["bf16-true"], steps=2,
                            measure_batches=1, fixes=False)
    result = report.mode("bf16-true")
    tokens, targets = batches[0]
    ref = copy.deepcopy(model)
    converted = mixprec.wrap(copy.deepcopy(model), None, "bf16-true")
    seen = {}
    converted.fc1.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    out = converted(tokens)
    # the layer's own error: the fp32 layer on the very input the bf16 layer got
    own = _direct_db(ref.fc1(seen["x"].float()), seen["y"].float())
    assert result.layer("fc1").out_db == pytest.approx(own, abs=0.1)
    # the model output
    assert result.output_db == pytest.approx(_direct_db(ref(tokens), out), abs=0.1)
    # sensitivity: the fp32 model with only fc1 in bf16
    fc1_bf16 = copy.deepcopy(ref.fc1).to(torch.bfloat16)
    handle = ref.fc1.register_forward_hook(
        lambda m, a, o: fc1_bf16(a[0].to(torch.bfloat16)).float())
    with torch.no_grad():
        hybrid = ref(tokens)
    handle.remove()
    with torch.no_grad():
        assert result.layer("fc1").impact_db == pytest.approx(
            _direct_db(ref(tokens), hybrid), abs=0.1)
    # the weight gradient (weight and bias together) against fp32's on the same batch
    _loss(ref, (tokens, targets)).backward()
    _loss(converted, (tokens, targets)).backward()
    ref_g = torch.cat([ref.fc1.weight.grad.flatten(), ref.fc1.bias.grad.flatten()])
    bf16_g = torch.cat([converted.fc1.weight.grad.flatten(), converted.fc1.bias.grad.flatten()])
    assert result.layer("fc1").grad_db == pytest.approx(_direct_db(ref_g, bf16_g), abs=0.1)
    assert 30 < result.layer("fc1").out_db < 80  # bf16: about 8 bits of mantissa


class Overflowing(torch.nn.Module):
    """One Linear layer (``big``) whose outputs exceed fp16's 65504; a norm after it
    brings them back, so the fp32 model is fine."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.big = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, 32)
        with torch.no_grad():
            self.embed.weight.mul_(2000.0)
            self.big.weight.mul_(100.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.big(self.embed(tokens))))


def test_a_layer_beyond_fp16_range_is_flagged_and_fp16_avoided():
    torch.manual_seed(0)
    model = Overflowing()
    with torch.no_grad():
        assert float(model.big(model.embed(make_batch()[0])).abs().max()) > 65504
    report = mixprec.doctor(model, _batches(), loss_fn=_loss, steps=6,
                            modes=["bf16-mixed", "16-mixed", "16-true"])
    for mode in ("16-mixed", "16-true"):
        result = report.mode(mode)
        overflow = [f for f in result.flags if f.cause == "fp16-overflow"]
        assert overflow and overflow[0].layers == ["big"], mode
        assert "big" in overflow[0].message
        assert result.layer("big").overflow and result.layer("big").act_amax > 65504
        assert not result.layer("head").overflow
        assert report.recommendation.verdicts[mode].startswith("not recommended")
    assert not report.mode("bf16-mixed").layer("big").overflow  # bf16 has fp32's range
    chosen = report.recommendation.candidate
    assert chosen is not None and not chosen.mode.startswith("16-")


def _bench_setup(preset: str = "tiny"):
    size = PRESETS[preset]
    torch.manual_seed(0)
    model = BenchGPT(size)
    data = list(MarkovTask(size.vocab, 0).batches(8, size.batch, size.seq, 1))

    def loss_fn(m, batch):
        return lm_loss(m(batch[:, :-1]), batch[:, 1:])

    def make_opt(params):
        return torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)

    return model, data, loss_fn, make_opt


def test_bf16_true_on_the_bench_model_loses_updates_and_masters_keep_them():
    model, data, loss_fn, make_opt = _bench_setup()
    report = mixprec.doctor(model, data, loss_fn=loss_fn, optimizer=make_opt,
                            modes=["bf16-true"], steps=20)
    plain = report.mode("bf16-true")
    lost = next(f for f in plain.flags if f.cause == "lost-updates")
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert sorted(lost.layers) == sorted(norms)  # gains near 1.0: bf16's ulp there is 2**-7
    for name in norms:
        assert plain.layer(name).lost > 0.8
    fixed = report.mode("bf16-true[master_weights=True]")
    assert fixed.candidate.fix_of == "bf16-true"
    assert fixed.lost < 0.01 and all((lr.lost or 0.0) < 0.01 for lr in fixed.layers)
    assert not any(f.cause == "lost-updates" for f in fixed.flags)
    assert report.recommendation.verdicts["bf16-true"].startswith(
        "use bf16-true[master_weights=True]")
    assert plain.bytes_per_param == pytest.approx(8.0, abs=0.05)


def test_the_user_model_is_not_changed():
    torch.manual_seed(0)
    model = TinyNet()
    model.fc2.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    report = mixprec.doctor(model, _batches(2), loss_fn=_loss, modes=["bf16-true"], steps=2)
    assert report.mode("bf16-true").status == "ok"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes
    assert not model.fc2.weight.requires_grad and model.fc1.weight.requires_grad
    assert not mixprec.is_wrapped(model) and all(p.grad is None for p in model.parameters())


def test_a_wrapped_model_is_refused():
    model = mixprec.wrap(TinyNet(), None, "bf16-mixed")
    with pytest.raises(mixprec.exceptions.WrapError, match="unwrap"):
        mixprec.doctor(model, _batches(1), loss_fn=_loss)


# -- plugin modes: nothing special -------------------------------------------------------


class CoarseLinear(mixprec.PrecisionMode):
    """A plugin mode: Linear weights rounded to 16 levels per row (frozen), except the
    layers ``ignore_modules`` names."""

    def __init__(self, *, ignore_modules=()) -> None:
        self.ignore_modules = tuple(ignore_modules)

    def options(self):
        return {"ignore_modules": list(self.ignore_modules)} if self.ignore_modules else {}

    def convert_module(self, module):
        count = 0
        for name, sub in module.named_modules():
            if isinstance(sub, torch.nn.Linear) and not mixprec.utils.match_module(
                    name, self.ignore_modules):
                with torch.no_grad():
                    w = sub.weight
                    step = w.abs().amax(1, keepdim=True) / 7
                    w.copy_((w / step).round() * step)
                w.requires_grad_(False)
                count += 1
        return [f"rounded {count} Linear weights to 4 bits (frozen)"]


def _coarse(*, ignore_modules=()):
    return CoarseLinear(ignore_modules=ignore_modules)


class CoarsePlugin:
    @staticmethod
    @mixprec.hookimpl
    def mixprec_modes():
        return [mixprec.ModeSpec("test-coarse", _coarse, "4-bit frozen Linear weights",
                                 tags={"frozen-weights"}, api_version=2)]


def test_a_plugin_mode_is_examined_and_its_ignore_modules_used(register_mixprec_plugin):
    register_mixprec_plugin(CoarsePlugin(), name="test-coarse-plugin")
    torch.manual_seed(0)
    model = TinyNet()
    model.head.weight = torch.nn.Parameter(model.head.weight.detach().clone())  # untie
    # a fully trainable model: the frozen-weights mode is left out of the default set
    chosen, left_out = default_modes(model, torch.device("cpu"))
    assert "test-coarse" not in chosen
    assert any(m == "test-coarse" and "adapters" in why for m, why in left_out)
    report = mixprec.doctor(model, _batches(), loss_fn=_loss, modes=["test-coarse"], steps=4,
                            sqnr_threshold=40.0)
    result = report.mode("test-coarse")
    assert result.takes == ("ignore_modules",)
    sensitive = next(f for f in result.flags if f.cause == "sensitive")
    ranked = [lr.name for lr in result.ranked()]
    assert sensitive.layers == ranked[:len(sensitive.layers)]
    for name in sensitive.layers:
        assert result.layer(name).impact_db < 40.0
    fixed = next(m for m in report.modes if m.candidate.fix_of == "test-coarse")
    assert dict(fixed.candidate.options)["ignore_modules"] == sorted(sensitive.layers)
    for name in sensitive.layers:  # kept in fp32: identical to the reference
        assert fixed.layer(name).impact_db == math.inf
    assert fixed.output_db > result.output_db


# -- the command -------------------------------------------------------------------------


def test_cli_on_the_bench_model(tmp_path, capsys):
    out_json, out_png = tmp_path / "doctor.json", tmp_path / "doctor.png"
    status = main(["doctor", "--size", "tiny", "--steps", "3", "--modes", "bf16-mixed",
                   "--quiet", "--json", str(out_json), "--plot", str(out_png)])
    assert status == 0
    text = capsys.readouterr().out
    assert "mixprec doctor: BenchGPT" in text and "mixprec.wrap(model, opt, " in text
    data = json.loads(out_json.read_text())
    assert [m["label"] for m in data["modes"]] == ["32-true", "bf16-mixed"]
    head = next(lr for lr in data["modes"][1]["layers"] if lr["name"] == "head")
    assert isinstance(head["impact_db"], float) and head["impact_db"] > 30
    assert data["modes"][0]["layers"][0]["impact_db"] == "inf"  # 32-true is fp32 itself
    assert data["recommendation"]["wrap"].startswith("model, opt = mixprec.wrap(")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_with_a_user_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "doctor_user.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(16, 4))\n"
        "def batches():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g))\n"
        "            for _ in range(3)]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    status = main(["doctor", "--model", "doctor_user:build", "--data", "doctor_user:batches",
                   "--modes", "bf16-true", "--steps", "2", "--quiet"])
    assert status == 0
    out = capsys.readouterr().out
    assert "mixprec doctor: Sequential, 212 parameters" in out
    assert main(["doctor", "--model", "doctor_user:build", "--quiet"]) == 2
    assert "--model needs --data" in capsys.readouterr().err
    assert main(["doctor", "--model", "doctor_user", "--data", "x:y", "--quiet"]) == 2
    assert "PKG.MOD:NAME" in capsys.readouterr().err


@pytest.mark.parametrize("flag, name, says", [
    ("--json", "missing/doctor.json", "does not exist"),
    ("--json", ".", "is a directory"),
    ("--plot", "doctor.xyz", "matplotlib cannot write .xyz"),
])
def test_cli_checks_output_paths_before_running(tmp_path, monkeypatch, capsys, flag, name, says):
    """A typo in --json/--plot is a usage error before anything runs (as in mixprec bench),
    not a traceback after the whole examination."""
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr("mixprec._doctor.cli.doctor", lambda *a, **k: ran.append(1))
    assert main(["doctor", "--size", "tiny", "--quiet", flag, name]) == 2
    assert says in capsys.readouterr().err and not ran
