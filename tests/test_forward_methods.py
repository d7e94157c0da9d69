"""Methods beyond ``forward``: ``generate`` and the model's other methods run under the
mode when named in ``forward_methods`` (``generate`` by default) or marked with
``model.mark_forward_method``; ``model.precision.autocast()`` and
``convert_input``/``convert_output`` give the same to any other code."""

from __future__ import annotations

import collections
import copy
import pickle

import pytest
import torch
from conftest import TinyNet, make_batch
from torch.utils._python_dispatch import TorchDispatchMode

import mixprec
from mixprec.exceptions import WrapError
from mixprec.testing import seeded

MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm}


class MatmulDtypes(TorchDispatchMode):
    """Counts the dtypes of the matrix products run in the block (after autocast)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: collections.Counter[torch.dtype] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in MATMULS:
            matrix = args[1] if func.overloadpacket is torch.ops.aten.addmm else args[0]
            self.dtypes[matrix.dtype] += 1
        return func(*args, **(kwargs or {}))


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, pad_token_id=0)
    return seeded(transformers.LlamaForCausalLM, config).eval()


def _generate(model, **extra):
    prompt = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                          do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                          output_logits=True, **extra)


def test_generate_runs_under_bf16_mixed_like_a_manual_autocast():
    """Out of the box for a transformers model: every matmul of ``generate`` in bf16, and
    the same tokens and logits as the unwrapped model under ``torch.autocast``."""
    plain = tiny_llama()
    reference = copy.deepcopy(plain)
    wrapped = mixprec.wrap(plain, None, "bf16-mixed")
    assert wrapped.forward_methods == {"generate"}

    with MatmulDtypes() as counted:
        out = _generate(wrapped)
    assert set(counted.dtypes) == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _generate(reference)
    assert torch.equal(out.sequences, expected.sequences)
    for got, want in zip(out.logits, expected.logits, strict=True):
        assert got.dtype == torch.float32  # the output conversion of the mixed modes
        assert torch.equal(got, want.float())
    fp32 = _generate(reference)
    assert not all(torch.equal(a, b) for a, b in zip(out.logits, fp32.logits, strict=True))


def test_generate_runs_in_bf16_under_bf16_true():
    wrapped = mixprec.wrap(tiny_llama(), None, "bf16-true")
    with MatmulDtypes() as counted:
        out = _generate(wrapped)
    assert set(counted.dtypes) == {torch.bfloat16}
    assert {t.dtype for t in out.logits} == {torch.float32}


def test_forward_methods_empty_leaves_generate_as_it_is():
    wrapped = mixprec.wrap(tiny_llama(), None, "bf16-mixed", forward_methods=())
    assert wrapped.forward_methods == frozenset()
    with MatmulDtypes() as counted:
        _generate(wrapped)
    assert set(counted.dtypes) == {torch.float32}


class Encoder(TinyNet):
    """TinyNet with methods besides forward."""

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc1(features)

    def generate(self, tokens: torch.Tensor) -> torch.Tensor:
        return self(tokens).argmax(-1)


def test_named_methods_convert_inputs_run_in_the_mode_and_convert_outputs():
    model = mixprec.wrap(seeded(Encoder), None, "bf16-true", forward_methods=["encode"])
    assert model.forward_methods == {"encode"}
    features = torch.randn(3, 16)
    with MatmulDtypes() as counted:
        out = model.encode(features)  # an fp32 input meets bf16 weights: converted first
    assert set(counted.dtypes) == {torch.bfloat16} and out.dtype == torch.float32
    assert model.encode.__name__ == "encode"

    model.mark_forward_method("generate")
    assert model.forward_methods == {"encode", "generate"}
    tokens, _ = make_batch()
    with MatmulDtypes() as counted:
        model.generate(tokens)
    assert set(counted.dtypes) == {torch.bfloat16}


def test_a_model_with_generate_gets_it_by_default_and_copies_keep_the_methods():
    model = mixprec.wrap(seeded(Encoder), None, "bf16-mixed", forward_methods=("encode",))
    assert model.forward_methods == {"encode"}
    model = mixprec.wrap(seeded(Encoder), None, "bf16-mixed")
    assert model.forward_methods == {"generate"}
    assert mixprec.wrap(seeded(TinyNet), None, "bf16-mixed").forward_methods == frozenset()
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.forward_methods == {"generate"}
        tokens, _ = make_batch()
        with MatmulDtypes() as counted:
            copied.generate(tokens)
        assert set(counted.dtypes) == {torch.bfloat16}


@pytest.mark.parametrize(("methods", "message"), [
    (["encdoe"], r"The model has no method 'encdoe' to run under the mode; check the name"),
    (["state_dict"], r"'state_dict' is a method of every wrapped module, which mixprec runs"),
    (["forward"], r"'forward' is a method of every wrapped module"),
    ([3], r"forward_methods takes method names \(str\), got 3"),
])
def test_bad_forward_methods_are_refused_before_anything_changes(methods, message):
    model = seeded(Encoder)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(WrapError, match=message):
        mixprec.wrap(model, opt, "bf16-true", forward_methods=methods)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not mixprec.is_wrapped(model)
    with pytest.raises(WrapError, match=r"forward_methods takes a list of method names; "
                                        r"write forward_methods=\('encode',\)"):
        mixprec.wrap(model, opt, "bf16-true", forward_methods="encode")


def test_mark_forward_method_refuses_what_it_cannot_route():
    model = mixprec.wrap(seeded(Encoder), None, "bf16-mixed")
    with pytest.raises(WrapError, match="no method 'missing'"):
        model.mark_forward_method("missing")
    with pytest.raises(WrapError, match="'train' is a method of every wrapped module"):
        model.mark_forward_method("train")
    assert model.forward_methods == {"generate"}


@pytest.mark.parametrize(("mode", "dtype"), [("bf16-mixed", torch.bfloat16),
                                              ("16-mixed", torch.float16),
                                              ("bf16-true", torch.bfloat16),
                                              ("32-true", torch.float32)])
def test_autocast_and_conversions_are_the_forwards(mode, dtype):
    """``precision.autocast()`` is the forward's context; ``convert_input`` and
    ``convert_output`` its conversions: together they run any code as the forward."""
    model = mixprec.wrap(seeded(Encoder), None, mode)
    features = torch.randn(3, 16)
    with model.precision.autocast(), MatmulDtypes() as counted:
        hidden = model.module.encode(model.precision.convert_input(features))
    assert set(counted.dtypes) == {dtype}
    out = model.precision.convert_output(hidden)
    assert out.dtype == torch.float32
    tokens, _ = make_batch()
    assert torch.equal(model(tokens), model.precision.convert_output(
        _in_context(model, lambda: model.module(*model.precision.convert_input((tokens,))))))


def _in_context(model, fn):
    with model.precision.autocast():
        return fn()
