"""mixprec-torchao under ``torch.compile``, in both orders: ``fp8-tensorwise`` (torchao's
Float8Linear, made for compile) trains as in eager, keeps eager's parameter names and
keys, its checkpoints move between compiled and eager runs, and its forward is one
graph."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, make_mlp, train

from mixprec.testing import checkpoint_roundtrip, wrap_quietly

MODE = "fp8-tensorwise"
ORDERS = ["wrap-then-compile", "compile-then-wrap"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _wrapped(order="eager", seed=0):
    model = make_mlp(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if order == "compile-then-wrap":  # aot_eager: autograd traced, no C++ to build
        return wrap_quietly(torch.compile(model, backend="aot_eager"), opt, MODE)
    wrapped, wopt = wrap_quietly(model, opt, MODE)
    if order == "wrap-then-compile":
        wrapped.compile(backend="aot_eager")
    return wrapped, wopt


@pytest.mark.parametrize("order", ORDERS)
def test_compiled_fp8_training_matches_eager_and_checkpoints_move(order):
    eager, eager_opt = _wrapped()
    expected = train(eager, eager_opt, 2)
    eager_checkpoint = checkpoint_roundtrip(eager_opt.precision.state_dict())
    expected += train(eager, eager_opt, 2, start=2)

    model, opt = _wrapped(order)
    assert train(model, opt, 2) == pytest.approx(expected[:2], rel=1e-5)
    assert list(model.state_dict()) == list(eager.state_dict())
    checkpoint = checkpoint_roundtrip(opt.precision.state_dict())

    resumed, resumed_opt = _wrapped(seed=1)  # eager, from the compiled run
    resumed_opt.precision.load_state_dict(checkpoint)
    assert train(resumed, resumed_opt, 2, start=2) == pytest.approx(expected[2:], rel=1e-5)
    resumed, resumed_opt = _wrapped(order, seed=1)  # compiled, from eager
    resumed_opt.precision.load_state_dict(eager_checkpoint)
    assert train(resumed, resumed_opt, 2, start=2) == pytest.approx(expected[2:], rel=1e-5)


def test_fp8_forward_compiles_into_one_graph():
    model, _ = _wrapped()
    x, _ = batch(0)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
