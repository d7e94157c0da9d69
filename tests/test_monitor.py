"""mixprec.Monitor: records every N steps (values equal to a direct computation), a
bounded history, a JSON-lines file and a callback; one early warning per cause."""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings

import pytest
import torch
from conftest import TinyNet, make_batch

import mixprec


def _loss(model, i: int, factor: float = 1.0):
    tokens, targets = make_batch(seed=i)
    return factor * torch.nn.functional.cross_entropy(model(tokens).float().flatten(0, 1),
                                                      targets.flatten())


def _train(model, opt, steps: int, start: int = 0, factor=lambda i: 1.0):
    for i in range(start, start + steps):
        opt.backward(_loss(model, i, factor(i)))
        opt.step()
        opt.zero_grad()


def _wrapped(mode: str = "32-true", lr: float = 1e-3, net=None, **options):
    torch.manual_seed(0)
    net = TinyNet() if net is None else net
    return mixprec.wrap(net, torch.optim.AdamW(net.parameters(), lr=lr), mode, **options)


def test_records_every_n_steps_into_a_bounded_history_a_file_and_a_callback(tmp_path):
    seen = []
    path = tmp_path / "numerics.jsonl"
    monitor = mixprec.Monitor(every=3, history=2, path=path, callback=seen.append, warn=False)
    model, opt = _wrapped(monitor=monitor)
    _train(model, opt, 10)
    assert [r["step"] for r in seen] == [0, 3, 6, 9]
    assert [r["step"] for r in monitor.history] == [6, 9]  # bounded
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 3, 6, 9]
    record = lines[-1]
    assert set(record["layers"]) == {"embed", "fc1", "norm", "fc2", "head"}
    assert record["loss_scale"] is None and record["skipped"] is False
    fc1 = record["layers"]["fc1"]
    assert fc1["dtype"] == "float32" and fc1["underflow"] is None  # nothing scaled here
    assert fc1["lost"] == 0.0 and fc1["act_amax"] > 0 and fc1["grad_norm"] > 0
    # between recorded steps no hook stays on the model
    assert not model.module.fc1._forward_hooks


def test_recorded_values_equal_a_direct_computation():
    torch.manual_seed(0)
    net = TinyNet()
    reference = copy.deepcopy(net)
    monitor = mixprec.Monitor(every=5, warn=False)
    model, opt = _wrapped(net=net, monitor=monitor)
    _train(model, opt, 1)
    (record,) = monitor.history
    # the same first step by hand, in plain torch
    seen = {}
    reference.fc1.register_forward_hook(lambda m, a, out: seen.update(out=out))
    loss = _loss(reference, 0)
    seen["out"].register_hook(lambda g: seen.update(grad=g))
    loss.backward()
    fc1 = record["layers"]["fc1"]
    assert fc1["act_amax"] == pytest.approx(float(seen["out"].detach().abs().max()))
    grads = [reference.fc1.weight.grad, reference.fc1.bias.grad]
    assert fc1["grad_norm"] == pytest.approx(
        math.sqrt(sum(float(g.square().sum()) for g in grads)))
    assert fc1["grad_amax"] == pytest.approx(
        max(float(seen["grad"].abs().max()), *(float(g.abs().max()) for g in grads)))
    total = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
    assert record["grad_norm"] == pytest.approx(float(total), rel=1e-5)


def test_fp16_underflow_share_and_the_loss_scale_are_recorded():
    monitor = mixprec.Monitor(every=1, warn=False)
    model, opt = _wrapped("16-mixed", monitor=monitor)
    _train(model, opt, 2)
    record = monitor.history[-1]
    assert record["loss_scale"] == opt.precision.loss_scale
    fc1 = record["layers"]["fc1"]
    assert fc1["dtype"] == "float16" and 0.0 <= fc1["underflow"] < 0.5
    assert record["scale_allowed"] == pytest.approx(
        65504 / max(v["grad_amax"] for v in record["layers"].values()))


def test_updates_lost_to_rounding_warn_once():
    monitor = mixprec.Monitor(every=2)
    model, opt = _wrapped("bf16-true", lr=1e-3, monitor=monitor)
    with pytest.warns(mixprec.MixprecWarning, match="round away") as caught:
        _train(model, opt, 6)
    assert len([w for w in caught if "round away" in str(w.message)]) == 1
    assert monitor.history[-1]["layers"]["norm"]["lost"] > 0.5  # gains at 1.0, bf16 ulp 2**-7
    # with fp32 masters nothing is lost
    monitor = mixprec.Monitor(every=2)
    model, opt = _wrapped("bf16-true", lr=1e-3, monitor=monitor, master_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, 6)
    assert all((v["lost"] or 0.0) < 0.01 for v in monitor.history[-1]["layers"].values())


class Growing(torch.nn.Module):
    """A Linear layer whose output magnitude the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.big = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.big(self.embed(tokens))))


def _amax(model) -> float:
    with torch.no_grad():
        return float(model.big(model.embed(make_batch(seed=0)[0])).abs().max())


def test_fp16_activations_near_the_limit_warn():
    torch.manual_seed(0)
    net = Growing()
    with torch.no_grad():
        net.big.weight.mul_(20000.0 / _amax(net))  # about 20000: within 8x of 65504
    model, opt = _wrapped("16-mixed", net=net, monitor=mixprec.Monitor(every=1))
    with pytest.warns(mixprec.MixprecWarning, match="'big' produced .* about to overflow"):
        _train(model, opt, 1)


def test_fp16_activations_growing_towards_the_limit_warn_before_they_get_there():
    torch.manual_seed(0)
    net = Growing()
    with torch.no_grad():
        net.big.weight.mul_(100.0 / _amax(net))
    monitor = mixprec.Monitor(every=1)
    model, opt = _wrapped("16-mixed", net=net, monitor=monitor)
    with pytest.warns(mixprec.MixprecWarning, match=r"'big' grow 2\.00x .* pass fp16's") as w:
        for i in range(4):  # 100, 200, 400, 800: far from 65504, but doubling
            _train(model, opt, 1, start=i)
            with torch.no_grad():
                model.module.big.weight.mul_(2.0)
    assert monitor.history[-1]["layers"]["big"]["act_amax"] < 65504 / 8
    assert len(w) == 1


def test_a_loss_scale_stuck_far_below_what_gradients_allow_warns():
    monitor = mixprec.Monitor(every=1)
    model, opt = _wrapped("16-mixed", monitor=monitor, init_scale=1.0)
    with pytest.warns(mixprec.MixprecWarning, match="loss scale is 1 .* below what the "):
        _train(model, opt, 2)
    assert monitor.history[-1]["scale_allowed"] > 2**10


def test_a_gradient_norm_jump_warns():
    monitor = mixprec.Monitor(every=1)
    model, opt = _wrapped("32-true", monitor=monitor)
    _train(model, opt, 2)
    with pytest.warns(mixprec.MixprecWarning, match=r"gradient norm of layer .* jumped"):
        _train(model, opt, 1, start=2, factor=lambda i: 1e4)


def test_a_monitor_serves_one_wrapper():
    monitor = mixprec.Monitor()
    _wrapped(monitor=monitor)
    with pytest.raises(mixprec.exceptions.WrapError, match=r"its own mixprec\.Monitor"):
        _wrapped(monitor=monitor)
    with pytest.raises(mixprec.exceptions.ModeOptionError):
        mixprec.Monitor(every=0)


def test_audit_sees_the_first_forward_when_a_monitor_is_attached():
    model, opt = _wrapped("bf16-mixed", monitor=mixprec.Monitor(every=100))
    _train(model, opt, 1)
    forward = {e.what: e.dtype for e in opt.precision.audit(show=False).entries("forward")}
    assert forward == {"model output": "float32", "loss given to opt.backward": "float32"}



# dynamo reads .grad of the activations it hands to the code after a graph break (its
# own tensor wrapping, not the monitor's code), and torch warns about that
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_a_compiled_model_is_traced_once_with_the_monitors_hooks(caplog):
    """Under ``model.compile()`` the recorded steps reuse the graphs traced for the first
    one: the monitor registers the same hooks each time and runs them outside the graphs.
    Before, dynamo traced into the hooks, recompiling them per layer dtype until torch's
    recompile limit (bf16 and fp32 layers in bf16-mixed). The records equal an eager run's."""
    from torch._dynamo.utils import counters

    from mixprec._bench.model import PRESETS, BenchGPT, MarkovTask, lm_loss

    size = PRESETS["tiny"]
    batches = list(MarkovTask(size.vocab, 0).batches(24, size.batch, size.seq, 1))

    def run(monitor, compiled, steps):
        torch.manual_seed(0)
        net = BenchGPT(size)
        model, opt = mixprec.wrap(net, torch.optim.AdamW(net.parameters(), lr=3e-3),
                                  "bf16-mixed", monitor=monitor)
        if compiled:
            model.compile()
        for i, batch in enumerate(batches[:steps]):
            opt.backward(lm_loss(model(batch[:, :-1]), batch[:, 1:]))
            opt.step()
            opt.zero_grad()
            if i == 5:
                yield counters["stats"]["unique_graphs"]

    torch._dynamo.reset()
    counters.clear()
    eager = mixprec.Monitor(every=2, warn=False)
    list(run(eager, False, 6))
    monitor = mixprec.Monitor(every=2, warn=False)
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        graphs = list(run(monitor, True, 24))  # after 3 records, then 9 more records
    assert counters["stats"]["unique_graphs"] == graphs[0]
    assert not [r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert [r["step"] for r in monitor.history] == list(range(0, 24, 2))
    for want, got in zip(eager.history, monitor.history[:3]):
        for name, layer in want["layers"].items():
            # inductor's bf16 kernels round a little differently from eager's
            assert got["layers"][name]["act_amax"] == pytest.approx(layer["act_amax"], rel=0.02)
            assert got["layers"][name]["grad_amax"] == pytest.approx(layer["grad_amax"], rel=0.02)
    torch._dynamo.reset()
