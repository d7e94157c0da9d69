"""Which layers go to FP8, what the summary and the warning say, errors before mutation,
state dicts, unwrap."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import MLP, batch, make_mlp, train

import mixprec
from mixprec.exceptions import ModeOptionError, UnsupportedDeviceError, WrapError
from mixprec.testing import checkpoint_roundtrip as roundtrip
from mixprec.testing import wrap_quietly as wrap_quiet


def _is_fp8(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Float8Linear" and type(module).__module__.startswith(
        "torchao.float8")


def _snapshot(model: torch.nn.Module) -> tuple[list, dict]:
    return ([(n, type(m)) for n, m in model.named_modules()],
            {n: (p, p.data.clone(), p.dtype) for n, p in model.named_parameters()})


def _unchanged(model: torch.nn.Module, snap: tuple[list, dict]) -> bool:
    types, params = snap
    if [(n, type(m)) for n, m in model.named_modules()] != types:
        return False
    now = dict(model.named_parameters())
    return all(now[n] is p and now[n].dtype == dt and torch.equal(now[n].data, data)
               for n, (p, data, dt) in params.items())


def test_linears_go_to_fp8_and_the_rest_is_named_in_summary_and_one_warning() -> None:
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.warns(mixprec.MixprecWarning) as record:
        model, opt = mixprec.wrap(model, opt, mode="fp8-tensorwise")
    assert len(record) == 1
    message = str(record[0].message)
    assert "1 nn.Linear layer(s) stay in high precision: head (in_features=16, out_features=10" \
           in message
    assert record[0].filename == __file__  # points at the user's wrap() call
    inner = model.module
    assert [_is_fp8(inner.body[i]) for i in (0, 2, 4)] == [True, True, True]
    assert type(inner.head) is torch.nn.Linear
    summary = opt.precision.summary
    assert "3 nn.Linear layers to FP8: body.0, body.2, body.4" in summary
    assert "kept in high precision: head (in_features=16, out_features=10: FP8 needs both " \
           "divisible by 16)" in summary
    assert "rest of the forward under torch.autocast('cpu', torch.bfloat16); parameters " \
           "torch.float32" in summary
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_no_warning_when_every_linear_converts() -> None:
    model = make_mlp(n_out=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = mixprec.wrap(model, mode="fp8-rowwise")
    assert "kept in high precision" not in model.precision.summary


def test_ignore_modules_by_suffix_glob_and_parent() -> None:
    model = make_mlp(n_out=16)
    with pytest.warns(mixprec.MixprecWarning, match=r"body\.2 \(excluded by ignore_modules "
                                                    r"'body\.2'\); head \(excluded"):
        model = mixprec.wrap(model, mode="fp8-tensorwise", ignore_modules=["head", "body.2"])
    inner = model.module
    assert [_is_fp8(inner.body[i]) for i in (0, 2, 4)] == [True, False, True]
    assert not _is_fp8(inner.head)

    nested = torch.nn.ModuleDict({"blocks": torch.nn.ModuleList(
        [torch.nn.ModuleDict({"up": torch.nn.Linear(16, 32), "down": torch.nn.Linear(32, 16)})
         for _ in range(2)])})
    wrapped = wrap_quiet(nested, None, "fp8-tensorwise", ignore_modules="blocks.*.down")
    kinds = {n: _is_fp8(m) for n, m in wrapped.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {"blocks.0.up": True, "blocks.0.down": False,
                     "blocks.1.up": True, "blocks.1.down": False}

    nested2 = torch.nn.ModuleDict({"blocks": torch.nn.ModuleList(
        [torch.nn.ModuleDict({"up": torch.nn.Linear(16, 32)}) for _ in range(2)]),
        "out": torch.nn.Linear(32, 16)})
    wrapped2 = wrap_quiet(nested2, None, "fp8-tensorwise", ignore_modules=["blocks.1"])
    kinds2 = {n: _is_fp8(m) for n, m in wrapped2.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds2 == {"blocks.0.up": True, "blocks.1.up": False, "out": True}


def test_module_filter_like_torchao() -> None:
    seen = []

    def only_first(module: torch.nn.Module, fqn: str) -> bool:
        seen.append(fqn)
        return fqn == "body.0"

    model = wrap_quiet(make_mlp(n_out=16), None, "fp8-tensorwise", module_filter=only_first)
    assert seen == ["body.0", "body.2", "body.4", "head"]
    assert [_is_fp8(m) for m in (*model.module.body[::2], model.module.head)] == [
        True, False, False, False]
    assert "kept in high precision: body.2 (excluded by module_filter)" in model.precision.summary


def test_unknown_ignore_name_is_an_error_before_anything_changes() -> None:
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters())
    snap = _snapshot(model)
    with pytest.raises(ModeOptionError, match=r"ignore_modules entry 'haed' names no module of "
                                              r"the model\. Did you mean 'head'\?"):
        mixprec.wrap(model, opt, mode="fp8-tensorwise", ignore_modules=["haed"])
    assert _unchanged(model, snap)
    assert not mixprec.is_wrapped(model)
    # names match whole dotted parts, from the start or the end (as in mixprec-bnb and
    # mixprec-te): "0" would select "body.0", "ody.0" selects nothing
    with pytest.raises(ModeOptionError, match=r"ignore_modules entry 'ody.0' names no module"):
        mixprec.wrap(model, opt, mode="fp8-tensorwise", ignore_modules="ody.0")
    assert _unchanged(model, snap)


def test_nothing_to_convert_is_an_error() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
    snap = _snapshot(model)
    with pytest.raises(WrapError, match=r"Mode 'fp8-rowwise' found no nn.Linear layer it can run "
                                        r"in FP8 \(0: in_features=10, out_features=20: FP8 needs "
                                        r"both divisible by 16; 2: .*use 'bf16-mixed'"):
        mixprec.wrap(model, mode="fp8-rowwise")
    assert _unchanged(model, snap)


def test_failing_optimizer_mode_leaves_model_and_optimizer_untouched() -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = _snapshot(model)
    with pytest.raises(WrapError, match=r"replaces torch.optim.AdamW \(or Adam\), but the "
                                        r"optimizer is torch.optim.sgd.SGD"):
        mixprec.wrap(model, opt, mode="fp8-tensorwise+ao-adamw8bit")
    assert _unchanged(model, snap)
    assert opt.param_groups[0]["params"] == list(model.parameters())


def test_linear_subclasses_are_kept() -> None:
    class MyLinear(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), MyLinear(16, 16))
    model = wrap_quiet(model, None, "fp8-tensorwise")
    assert _is_fp8(model.module[0])
    assert type(model.module[1]) is MyLinear
    assert "1 (a subclass of nn.Linear (MyLinear), not swapped)" in model.precision.summary


def test_an_already_converted_model_is_refused() -> None:
    from torchao.float8 import convert_to_float8_training

    model = convert_to_float8_training(torch.nn.Sequential(torch.nn.Linear(16, 16)))
    with pytest.raises(WrapError, match=r"Module '0' is already a torchao Float8Linear; pass the "
                                        r"model before convert_to_float8_training"):
        mixprec.wrap(model, mode="fp8-tensorwise")


def test_devices_without_autocast_or_fp8_are_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, device="meta"))
    with pytest.raises(UnsupportedDeviceError, match=r"not on 'meta'|does not offer on 'meta'"):
        mixprec.wrap(model, mode="fp8-tensorwise")


def test_a_bare_linear_converts_in_place_and_unwraps() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    reference = torch.nn.Linear(32, 16)
    reference.load_state_dict(linear.state_dict())
    opt = torch.optim.AdamW(linear.parameters())
    weight = linear.weight
    model, opt = mixprec.wrap(linear, opt, mode="fp8-tensorwise")
    assert _is_fp8(model.module) and model.module is linear and linear.weight is weight
    x = torch.randn(8, 32)
    out = model(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(x), atol=0.1, rtol=0.1)
    plain = mixprec.unwrap(model)
    assert type(plain) is torch.nn.Linear and plain.weight is weight
    torch.testing.assert_close(plain(x), reference(x))


def test_user_hooks_and_eval_mode_survive_the_swap() -> None:
    model = make_mlp(n_out=16).eval()
    calls = []
    model.body[2].register_forward_hook(lambda m, i, o: calls.append(o.dtype))
    model = wrap_quiet(model, None, "fp8-tensorwise")
    assert not model.module.body[2].training
    model(torch.randn(4, 32))
    assert calls == [torch.bfloat16]


def test_unwrap_gives_plain_linears_with_the_trained_parameters() -> None:
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = wrap_quiet(model, opt, "fp8-rowwise")
    train(model, opt, 3)
    params = dict(model.named_parameters())
    plain = mixprec.unwrap(model)
    assert isinstance(plain, MLP)
    assert all(type(m) is torch.nn.Linear for m in plain.modules()
               if isinstance(m, torch.nn.Linear))
    assert all(not m._forward_pre_hooks for m in plain.modules())
    assert all(p is params[n] for n, p in plain.named_parameters())
    x, _ = batch(0)
    fresh = make_mlp()
    fresh.load_state_dict(plain.state_dict())
    torch.testing.assert_close(plain(x), fresh(x))


def test_state_dict_keys_match_the_plain_model_both_ways() -> None:
    plain = make_mlp()
    model = wrap_quiet(make_mlp(seed=1), None, "fp8-tensorwise")
    state = roundtrip(model.state_dict())
    assert list(state) == list(plain.state_dict())
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in state.values())
    model.load_state_dict(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    other = make_mlp(seed=2)
    other.load_state_dict(state)


def test_bf16_parameters_with_fp32_masters() -> None:
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = wrap_quiet(model, opt, "fp8-tensorwise", param_dtype="bf16",
                            master_weights=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for g in opt.param_groups for p in g["params"]} == {torch.float32}
    losses = train(model, opt, 8)
    assert losses[-1] < losses[0]
    state = model.state_dict()
    assert {v.dtype for v in state.values()} == {torch.float32}  # the masters


def test_without_autocast_the_rest_runs_in_param_dtype() -> None:
    model = make_mlp()
    outputs = []
    model.norm.register_forward_hook(lambda m, i, o: outputs.append(o.dtype))
    model = wrap_quiet(model, None, "fp8-rowwise-gw-hp", autocast=None, keep_output_dtype=True)
    out = model(torch.randn(4, 32))
    assert outputs == [torch.float32] and out.dtype == torch.float32
    assert "rest of the forward in torch.float32 (no autocast)" in model.precision.summary
    out.sum().backward()

    bf16 = wrap_quiet(make_mlp(), None, "fp8-tensorwise", autocast=None, param_dtype="bf16",
                      keep_output_dtype=True)
    assert bf16(torch.randn(4, 32)).dtype == torch.bfloat16


def test_init_module_builds_in_bf16() -> None:
    with mixprec.init_module("fp8-tensorwise", param_dtype="bf16") as precision:
        model = MLP()
    assert torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixprec.MixprecWarning)
        wrapped = precision.wrap(model)
    assert wrapped(torch.randn(2, 32)).dtype == torch.float32
