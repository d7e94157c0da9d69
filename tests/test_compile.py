"""torch.compile and mixprec, in both orders: wrap then compile (``model.compile()`` or
``torch.compile(model)``) and compile then wrap (``wrap(torch.compile(model))``).

Every core mode trains under compile as it does eagerly (bit for bit with dynamo's
``eager`` backend, within rounding with the default inductor backend), its parameter
names and state-dict keys are eager's in every order, checkpoints move between
compiled and eager runs, and mixprec puts no graph break into the compiled forward.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import CORE_IDS, CORE_MODES, TinyNet, loss_of, make_batch

import mixprec
from mixprec.testing import assert_state_equal, checkpoint_roundtrip, seeded, train_steps

#: how the compiled model is made from the plain one; returns (what the loop calls, the
#: wrapped module, the wrapped optimizer)
ORDERS = ["wrap-then-model.compile", "wrap-then-torch.compile", "compile-then-wrap"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own models: no cache entries (or recompile limits) shared."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _wrapped(mode, options, order="eager", backend="eager", seed=0):
    model = seeded(TinyNet, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if order == "compile-then-wrap":
        wrapped, wopt = mixprec.wrap(torch.compile(model, backend=backend), opt, mode, **options)
        return wrapped, wrapped, wopt
    wrapped, wopt = mixprec.wrap(model, opt, mode, **options)
    if order == "wrap-then-model.compile":
        wrapped.compile(backend=backend)
    elif order == "wrap-then-torch.compile":
        return torch.compile(wrapped, backend=backend), wrapped, wopt
    return wrapped, wrapped, wopt


def _train(model, opt, steps, start=0):
    return train_steps(opt, lambda i: loss_of(model, *make_batch(seed=i)), steps, start=start)


def _saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("mode", "options"), CORE_MODES, ids=CORE_IDS)
def test_compiled_training_is_eager_training(mode, options, order):
    """Dynamo's ``eager`` backend runs the captured graph op for op: losses, weights,
    masters, optimizer state and scaler equal the eager run's bit for bit, under the
    eager run's names and keys; a compiled run's checkpoint resumes an eager run and an
    eager run's a compiled one, as if training had gone on."""
    eager, eager_wrapped, eager_opt = _wrapped(mode, options)
    expected = _train(eager, eager_opt, 2)
    eager_checkpoint = _saved(eager_opt.precision.state_dict())
    expected += _train(eager, eager_opt, 2, start=2)

    model, wrapped, opt = _wrapped(mode, options, order)
    assert _train(model, opt, 2) == expected[:2]
    assert [n for n, _ in wrapped.named_parameters()] == [
        n for n, _ in eager_wrapped.named_parameters()]
    checkpoint = _saved(opt.precision.state_dict())
    assert_state_equal(eager_checkpoint, checkpoint)

    resumed, _, resumed_opt = _wrapped(mode, options, seed=1)  # eager, from the compiled run
    resumed_opt.precision.load_state_dict(checkpoint)
    assert _train(resumed, resumed_opt, 2, start=2) == expected[2:]
    resumed, _, resumed_opt = _wrapped(mode, options, order, seed=1)  # compiled, from eager
    resumed_opt.precision.load_state_dict(eager_checkpoint)
    assert _train(resumed, resumed_opt, 2, start=2) == expected[2:]


@pytest.mark.slow  # inductor generates and builds C++ for each mode (seconds with a warm cache)
@pytest.mark.parametrize(("mode", "options"), CORE_MODES, ids=CORE_IDS)
def test_inductor_trains_as_eager_within_rounding(mode, options):
    """The default backend (inductor) fuses and reorders, so 16-bit rounding differs a
    little from eager; losses agree within it, and the checkpoint has eager's keys and
    loads into an eager wrap."""
    eager, _, eager_opt = _wrapped(mode, options)
    expected = _train(eager, eager_opt, 3)

    model, _, opt = _wrapped(mode, options, "wrap-then-model.compile", backend="inductor")
    got = _train(model, opt, 3)
    low = mode.startswith(("16", "bf16"))
    assert got == pytest.approx(expected, rel=2e-2 if low else 1e-5)
    checkpoint = checkpoint_roundtrip(opt.precision.state_dict())
    assert list(checkpoint["model"]) == list(eager_opt.precision.state_dict()["model"])
    fresh, _, fresh_opt = _wrapped(mode, options, seed=1)
    fresh_opt.precision.load_state_dict(checkpoint)
    assert_state_equal(checkpoint["model"], fresh.state_dict())


def test_compile_then_wrap_names_parameters_and_keys_as_eager():
    """``wrap(torch.compile(model))`` wraps the plain module inside: no ``_orig_mod.``
    in names, keys, the summary or a diagnosis; ``unwrap`` gives the plain module back,
    and the wrapped forward runs the compiled one."""
    plain = seeded(TinyNet)
    compiled = torch.compile(plain, backend="eager")
    opt = torch.optim.AdamW(plain.parameters())
    wrapped, wopt = mixprec.wrap(compiled, opt, "bf16-true", master_weights=True)
    eager = seeded(TinyNet)
    eager_wrapped, eager_opt = mixprec.wrap(eager, torch.optim.AdamW(eager.parameters()),
                                            "bf16-true", master_weights=True)

    assert wrapped.module is plain
    keys = list(eager_wrapped.state_dict())
    assert list(wrapped.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    assert [n for n, _ in wrapped.named_parameters()] == [
        n for n, _ in eager_wrapped.named_parameters()]
    assert [n for n, _ in wrapped.named_modules()] == [n for n, _ in eager_wrapped.named_modules()]
    assert wopt.precision.summary == eager_opt.precision.summary
    assert wopt.precision.param_name(plain.fc1.weight) == "fc1.weight"
    wrapped.load_state_dict(eager_wrapped.state_dict())  # strict: the same keys

    torch._dynamo.utils.counters.clear()
    _train(wrapped, wopt, 1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled forward ran
    assert mixprec.unwrap(wrapped) is plain


def test_copies_of_a_compile_then_wrap_module_run_their_own_compiled_model():
    model = seeded(TinyNet)
    wrapped = mixprec.wrap(torch.compile(model, backend="eager"), None, "bf16-mixed")
    tokens, _ = make_batch()
    for copied in (copy.deepcopy(wrapped), _pickled(wrapped)):
        assert copied.module is not model
        assert copied._compiled._orig_mod is copied.module
        assert torch.equal(copied(tokens), wrapped(tokens))
        assert list(copied.state_dict()) == list(wrapped.state_dict())


def _pickled(module):
    """``module`` after ``torch.save`` of the whole module and a (trusted) load."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# -- graph breaks -------------------------------------------------------------------------


def _breaks(explained):
    return [f"{b.reason}".splitlines()[0] + " at " + " <- ".join(
        f"{f.filename}:{f.lineno}" for f in reversed(b.user_stack)) for b in explained.break_reasons]


@pytest.mark.parametrize(("mode", "options"), CORE_MODES, ids=CORE_IDS)
def test_no_graph_break_in_the_compiled_forward(mode, options):
    """Input conversion, the forward context and output conversion trace into the one
    graph of the model's forward (``torch._dynamo.explain``)."""
    _, wrapped, _ = _wrapped(mode, options)
    tokens, _ = make_batch()
    explained = torch._dynamo.explain(wrapped)(tokens)
    assert _breaks(explained) == []
    assert explained.graph_count == 1


@pytest.mark.parametrize("mode", ["bf16-mixed", "16-true"])
def test_no_graph_break_in_a_compiled_transformers_forward(mode):
    """A transformers causal LM (its ``ModelOutput`` result walked by the output
    conversion, labels passed as a keyword) compiles into one graph."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = seeded(transformers.LlamaForCausalLM, config)
    wrapped, _ = mixprec.wrap(model, torch.optim.AdamW(model.parameters()), mode)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(wrapped)(tokens, labels=tokens)
    assert _breaks(explained) == []
    assert explained.graph_count == 1
