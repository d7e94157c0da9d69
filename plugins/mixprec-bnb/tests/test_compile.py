"""mixprec-bnb under ``torch.compile``, in both orders: ``nf4`` and ``int8-training`` train
as in eager, name parameters, keys and ``ignore_modules`` matches as in eager, and their
checkpoints move between compiled and eager runs. ``nf4``'s forward is one graph;
``int8-training``'s graph breaks all come from bitsandbytes' own matmul."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes
import pytest
import torch
from conftest import lm_loss, make_lm, wrap_quiet
from mixprec_bnb import QuantLinear4bit

from mixprec.testing import checkpoint_roundtrip, train_steps

#: nf4 keeps ``blocks.1`` (both its Linear layers) out of quantization by name
MODES = [("nf4", {"ignore_modules": ["blocks.1"]}), ("int8-training", {})]
ORDERS = ["wrap-then-compile", "compile-then-wrap"]
BNB = Path(bitsandbytes.__file__).parent
TORCH = Path(torch.__file__).parent
#: dynamo, tracing bitsandbytes' ``getattr(B, "grad", None)`` on the int8 weight, reads
#: ``.grad`` of a non-leaf fake tensor and torch warns about it (not in eager)
NONLEAF_GRAD = "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _wrapped(mode, options, order="eager", seed=0):
    model = make_lm(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if order == "compile-then-wrap":  # aot_eager: autograd traced, no C++ to build
        return wrap_quiet(torch.compile(model, backend="aot_eager"), opt, mode, **options)
    wrapped, wopt = wrap_quiet(model, opt, mode, **options)
    if order == "wrap-then-compile":
        wrapped.compile(backend="aot_eager")
    return wrapped, wopt


def _train(model, opt, steps, start=0):
    return train_steps(opt, lambda step: lm_loss(model, step), steps, start=start)


@pytest.mark.filterwarnings(NONLEAF_GRAD)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("mode", "options"), MODES, ids=[m for m, _ in MODES])
def test_compiled_training_matches_eager_and_checkpoints_move(mode, options, order):
    eager, eager_opt = _wrapped(mode, options)
    expected = _train(eager, eager_opt, 2)
    eager_checkpoint = checkpoint_roundtrip(eager_opt.precision.state_dict())
    expected += _train(eager, eager_opt, 2, start=2)

    model, opt = _wrapped(mode, options, order)
    assert _train(model, opt, 2) == pytest.approx(expected[:2], rel=1e-5)
    assert list(model.state_dict()) == list(eager.state_dict())
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear4bit)]
    if mode == "nf4":  # ignore_modules matched the eager names in both orders
        assert quantized[:2] == ["blocks.0.up", "blocks.0.down"]
        assert not [n for n in quantized if n.startswith("blocks.1")]
    checkpoint = checkpoint_roundtrip(opt.precision.state_dict())

    resumed, resumed_opt = _wrapped(mode, options, seed=1)  # eager, from the compiled run
    resumed_opt.precision.load_state_dict(checkpoint)
    assert _train(resumed, resumed_opt, 2, start=2) == pytest.approx(expected[2:], rel=1e-5)
    resumed, resumed_opt = _wrapped(mode, options, order, seed=1)  # compiled, from eager
    resumed_opt.precision.load_state_dict(eager_checkpoint)
    assert _train(resumed, resumed_opt, 2, start=2) == pytest.approx(expected[2:], rel=1e-5)


def _explain(mode, options):
    model, _ = _wrapped(mode, options)
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    return torch._dynamo.explain(model)(tokens)


def test_nf4_forward_compiles_into_one_graph():
    explained = _explain("nf4", {})
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.filterwarnings(NONLEAF_GRAD)
def test_int8_training_graph_breaks_are_bitsandbytes_own():
    """bitsandbytes' ``MatMul8bitFp`` reads ``.grad`` of its ``Int8Params`` weight (a
    tensor subclass dynamo cannot trace that on) and rebuilds an ``Int8Params`` in
    ``.to()`` (dynamo cannot set ``requires_grad`` in a graph): breaks in each int8
    layer's forward, none in mixprec's or this plugin's code."""
    explained = _explain("int8-training", {})
    assert explained.graph_break_count > 0
    for reason in explained.break_reasons:
        files = [Path(f.filename) for f in reason.user_stack]
        innermost = next(f for f in reversed(files) if not f.is_relative_to(TORCH))
        assert innermost.is_relative_to(BNB), f"{reason.reason}: at {innermost}"
