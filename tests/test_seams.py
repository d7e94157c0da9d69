"""Integrity at the seams: what the user's own torch setup brings into a wrapped
model (its default dtype, threads, sparse and complex parameters, torch.compile,
models that share parameters, optimizer state loaded before wrap)."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable

import pytest
import torch
from conftest import CORE_IDS, CORE_MODES, TinyNet, train

import mixprec


def _tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def restore_default_dtype():
    """Put torch's default dtype back to fp32 after a test that changes it."""
    yield
    torch.set_default_dtype(torch.float32)


# -- a default dtype other than fp32 -------------------------------------------------------


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize(("mode", "options"), CORE_MODES, ids=CORE_IDS)
def test_every_core_mode_trains_under_a_non_fp32_default_dtype(
        restore_default_dtype, mode, options, default):
    def run(model: TinyNet) -> list[float]:
        model, opt = mixprec.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2), mode,
                                  **options)
        return train(model, opt, steps=4)

    ours, reference = _tiny(), _tiny()  # the same fp32 weights
    want = run(reference)
    torch.set_default_dtype(default)
    got = run(ours)
    assert got == want  # nothing mixprec creates follows the user's default dtype
    assert torch.get_default_dtype() is default


# -- sparse gradients and complex parameters ---------------------------------------------------


class SparseNet(torch.nn.Module):
    """An embedding with sparse gradients and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8, sparse=True)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


class ComplexNet(torch.nn.Module):
    """A linear layer followed by a trainable complex phase."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.phase = torch.nn.Parameter(torch.randn(8, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.lin(x) * self.phase).abs()


def _sparse_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 16, (6, 5), generator=g)  # repeated tokens: uncoalesced grads
    return model(tokens).float().pow(2).mean()


def _complex_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(6, 8, generator=g)
    return (model(x).float() - 1.0).pow(2).mean()


def _seeded(cls: type[torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls()


def _train_plain(model, opt, loss_fn, steps, scaler=None, autocast=None):
    for step in range(steps):
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = loss_fn(model, step)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()


def _train_wrapped(model, opt, loss_fn, steps):
    for step in range(steps):
        opt.backward(loss_fn(model, step))
        opt.step()
        opt.zero_grad()


def test_sparse_gradients_under_16_mixed_match_torch_autocast_and_gradscaler():
    ref = _seeded(SparseNet)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    _train_plain(ref, ref_opt, _sparse_loss, 4, torch.amp.GradScaler("cpu"), torch.float16)
    model = _seeded(SparseNet)
    model, opt = mixprec.wrap(model, torch.optim.SGD(model.parameters(), lr=0.5), "16-mixed")
    _train_wrapped(model, opt, _sparse_loss, 4)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize(("mode", "options"), CORE_MODES, ids=CORE_IDS)
def test_sparse_gradients_train_in_every_core_mode(mode, options):
    ref = _seeded(SparseNet)
    _train_plain(ref, torch.optim.SGD(ref.parameters(), lr=0.5), _sparse_loss, 4)
    model = _seeded(SparseNet)
    model, opt = mixprec.wrap(model, torch.optim.SGD(model.parameters(), lr=0.5), mode,
                              **options)
    _train_wrapped(model, opt, _sparse_loss, 4)
    assert opt.precision.skipped_steps == 0
    tol = {"32": 0, "64": 1e-6, "16": 1e-2, "bf16": 5e-2}[mode.split("-")[0]]
    for (name, p), q in zip(mixprec.unwrap(model).named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.float(), q, atol=tol, rtol=tol, msg=name)


def test_sparse_fp16_gradients_that_overflow_when_coalesced_skip_the_step():
    model = _seeded(SparseNet)
    model, opt = mixprec.wrap(model, torch.optim.SGD(model.parameters(), lr=0.5), "16-true",
                              init_scale=2.0**14)
    before = model.embed.weight.detach().clone()
    # token 3 eight times: each scaled row entry is finite, their sum is not
    out = model(torch.full((8,), 3))
    opt.backward(out[:, 0].float().sum() * 1.0)
    assert not model.embed.weight.grad.is_coalesced()
    opt.step()
    assert opt.precision.skipped_steps == 1 and opt.precision.loss_scale == 2.0**13
    assert torch.equal(model.embed.weight, before)


@pytest.mark.parametrize("mode", ["32-true", "64-true", "16-mixed", "bf16-mixed"])
def test_complex_parameters_train_and_stay_complex(mode):
    ref = _seeded(ComplexNet)
    _train_plain(ref, torch.optim.Adam(ref.parameters(), lr=1e-2), _complex_loss, 4)
    model = _seeded(ComplexNet)
    model, opt = mixprec.wrap(model, torch.optim.Adam(model.parameters(), lr=1e-2), mode)
    assert model.phase.dtype is torch.complex64
    _train_wrapped(model, opt, _complex_loss, 4)
    assert opt.precision.skipped_steps == 0
    tol = {"32-true": 0, "64-true": 1e-5, "16-mixed": 5e-3, "bf16-mixed": 3e-2}[mode]
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.to(q.dtype), q, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("mode", ["32-true", "16-mixed", "bf16-mixed"])
def test_a_non_finite_complex_gradient_skips_the_step(mode):
    model = _seeded(ComplexNet)
    model, opt = mixprec.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), mode)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.backward(_complex_loss(model, 0))
    model.phase.grad[2] = complex(0.0, float("inf"))
    opt.step()
    assert opt.precision.skipped_steps == 1
    assert opt.precision.last_nonfinite_param == "phase"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("mode", ["16-true", "bf16-true"])
def test_true_16_bit_modes_refuse_complex_parameters_by_name(mode):
    model = _seeded(ComplexNet)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(mixprec.exceptions.WrapError, match=r"'phase'.*complex64.*bf16-mixed"):
        mixprec.wrap(model, opt, mode)
    assert not mixprec.is_wrapped(model)
    for n, p in model.named_parameters():
        assert p.dtype is before[n].dtype and torch.equal(p, before[n]), n


@pytest.mark.parametrize("mode", ["32-true", "bf16-mixed", "16-mixed"])
def test_a_non_finite_sparse_gradient_skips_the_step_and_is_named(mode):
    model = _seeded(SparseNet)
    model, opt = mixprec.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), mode)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.backward(_sparse_loss(model, 0))
    model.embed.weight.grad._values()[1, 2] = float("nan")
    opt.step()
    assert opt.precision.skipped_steps == 1
    assert opt.precision.last_nonfinite_param == "embed.weight"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


# -- 32-true runs the forward as it is ---------------------------------------------------------


class _Recorder(torch.nn.Module):
    """Records the dtypes its forward receives; computes in fp64 where it is given fp64."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.seen: dict[str, torch.dtype] = {}

    def forward(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.seen = {"x": x.dtype, "half": extra["half"].dtype}
        return {"y": x @ self.lin.weight.double().T, "half": extra["half"] * 2}


def test_32_true_leaves_inputs_and_outputs_as_they_are():
    plain = _seeded(_Recorder)
    model = mixprec.wrap(_seeded(_Recorder), mode="32-true")
    x = torch.randn(3, 4, dtype=torch.float64)
    extra = {"half": torch.ones(2, dtype=torch.float16)}
    out, want = model(x, extra), plain(x, extra)
    assert model.seen == plain.seen == {"x": torch.float64, "half": torch.float16}
    assert out["y"].dtype is torch.float64 and out["half"].dtype is torch.float16
    torch.testing.assert_close(out["y"], want["y"], atol=0, rtol=0)


# -- threads: a forward never changes torch's process-wide default dtype -----------------------

_WAIT = 60.0  # seconds before a stuck interleaving fails the test instead of hanging it


class _Creating(TinyNet):
    """TinyNet whose forward adds a tensor it creates without a dtype, as user code does,
    and calls ``pause`` around the creation to let a test force an interleaving."""

    def __init__(self) -> None:
        super().__init__()
        self.pause: Callable[[], None] | None = None
        self.created: list[torch.dtype] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pause is not None:
            self.pause()
        bias = torch.full((self.embed.embedding_dim,), 0.5)
        self.created.append(bias.dtype)
        if self.pause is not None:
            self.pause()
        h = self.embed(tokens) + self.offset + bias
        h = h + self.fc2(torch.relu(self.norm(self.fc1(h))))
        return self.head(h)


def _in_thread(fn: Callable[[], object], on_error: Callable[[], None] = lambda: None):
    """Run ``fn`` in a thread; returns (thread, box) with the result or error in box."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # reported by the test's thread
            box["error"] = exc
            on_error()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def _joined(thread: threading.Thread, box: dict[str, object]) -> object:
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("result")


def test_64_true_creates_fp64_in_its_forward_while_another_thread_creates_fp32():
    inside, go_on = threading.Event(), threading.Event()

    def pause() -> None:
        if not inside.is_set():
            inside.set()
            assert go_on.wait(_WAIT)

    inner = _Creating()
    inner.pause = pause
    model = mixprec.wrap(inner, mode="64-true")
    thread, box = _in_thread(lambda: model(torch.zeros(2, 3, dtype=torch.long)),
                             on_error=inside.set)
    assert inside.wait(_WAIT)
    try:  # the 64-true forward is paused before and after its creation now
        assert torch.zeros(2).dtype is torch.float32
        assert torch.get_default_dtype() is torch.float32
    finally:
        go_on.set()
    out = _joined(thread, box)
    assert inner.created == [torch.float64] and out.dtype is torch.float64
    assert torch.get_default_dtype() is torch.float32


def test_overlapping_true_mode_forwards_leave_the_default_dtype_as_it_was():
    # bf16-true enters, 64-true enters, bf16-true leaves, 64-true leaves: with a
    # process-wide default dtype saved and restored per forward, bf16 is left behind.
    steps = {name: (threading.Event(), threading.Event()) for name in ("bf16", "fp64")}

    def pauser(name: str) -> Callable[[], None]:
        calls = []

        def pause() -> None:
            calls.append(None)
            entered, leave = steps[name]
            if len(calls) == 1:  # before the creation: say so, wait for the turn to leave
                entered.set()
                assert leave.wait(_WAIT)
        return pause

    models = {}
    for name, mode in (("bf16", "bf16-true"), ("fp64", "64-true")):
        inner = _Creating()
        inner.pause = pauser(name)
        models[name] = (inner, mixprec.wrap(inner, mode=mode))

    def forward(name: str) -> Callable[[], object]:
        return lambda: models[name][1](torch.zeros(2, 3, dtype=torch.long))

    release = [e for pair in steps.values() for e in pair]
    first, first_box = _in_thread(forward("bf16"), on_error=lambda: [e.set() for e in release])
    assert steps["bf16"][0].wait(_WAIT)
    second, second_box = _in_thread(forward("fp64"), on_error=lambda: [e.set() for e in release])
    assert steps["fp64"][0].wait(_WAIT)
    steps["bf16"][1].set()
    _joined(first, first_box)
    steps["fp64"][1].set()
    _joined(second, second_box)
    assert models["bf16"][0].created == [torch.bfloat16]
    assert models["fp64"][0].created == [torch.float64]
    assert torch.get_default_dtype() is torch.float32


def test_a_16_mixed_and_a_bf16_true_model_train_together_in_two_threads():
    def build(mode: str, pause: Callable[[], None] | None):
        torch.manual_seed(0)
        inner = _Creating()
        inner.pause = pause
        model, opt = mixprec.wrap(inner, torch.optim.AdamW(inner.parameters(), lr=1e-2), mode)
        return inner, model, opt

    steps = 5
    want = {}
    for mode in ("16-mixed", "bf16-true"):
        inner, model, opt = build(mode, None)
        want[mode] = (train(model, opt, steps), inner.created)
    assert want["16-mixed"][1] == [torch.float32] * steps
    assert want["bf16-true"][1] == [torch.bfloat16] * steps

    # Both forwards create their tensor at the same time, every step (and each
    # thread's backward and step run while the other is inside its forward).
    barrier = threading.Barrier(2, timeout=_WAIT)
    runs = {mode: build(mode, barrier.wait) for mode in ("16-mixed", "bf16-true")}
    threads = {mode: _in_thread(lambda m=model, o=opt: train(m, o, steps),
                                on_error=barrier.abort)
               for mode, (_, model, opt) in runs.items()}
    got = {mode: (_joined(*threads[mode]), runs[mode][0].created) for mode in runs}
    assert got == want
    assert torch.get_default_dtype() is torch.float32


# -- a part of a wrapped model cannot be wrapped again ------------------------------------------


def _parts(model: TinyNet, wrapped: torch.nn.Module) -> dict[str, torch.nn.Module]:
    sharing = torch.nn.Linear(16, 32)
    sharing.weight = model.fc1.weight
    return {
        "child": model.fc1,
        "parent of the plain model": torch.nn.Sequential(model, torch.nn.Linear(32, 2)),
        "parent of the wrapped model": torch.nn.Sequential(wrapped, torch.nn.Linear(32, 2)),
        "a module sharing a parameter": sharing,
    }


@pytest.mark.parametrize("part", ["child", "parent of the plain model",
                                  "parent of the wrapped model", "a module sharing a parameter"])
def test_wrapping_a_part_of_a_wrapped_model_is_refused_and_changes_nothing(part):
    model = _tiny()
    wrapped, opt = mixprec.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                                "bf16-true")
    other = _parts(model, wrapped)[part]
    before = {n: (p.dtype, p.detach().clone()) for n, p in other.named_parameters()}
    with pytest.raises(mixprec.exceptions.AlreadyWrappedError, match=r"mixprec\.unwrap"):
        mixprec.wrap(other, torch.optim.SGD(other.parameters(), lr=0.1), "16-true")
    assert {n: p.dtype for n, p in other.named_parameters()} == {
        n: d for n, (d, _) in before.items()}
    for n, p in other.named_parameters():
        assert torch.equal(p, before[n][1]), n
    reference = _tiny()  # the first model trains on as if nothing had been tried
    reference, ref_opt = mixprec.wrap(
        reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), "bf16-true")
    assert train(wrapped, opt, steps=3) == train(reference, ref_opt, steps=3)
    assert all(p.dtype is torch.bfloat16 for p in wrapped.parameters())


def test_a_part_of_an_unwrapped_model_can_be_wrapped():
    model = _tiny()
    wrapped = mixprec.wrap(model, mode="bf16-true")
    mixprec.unwrap(wrapped)
    child = mixprec.wrap(model.fc1, mode="16-true")
    assert child.weight.dtype is torch.float16


# -- torch.compile of a wrapped model -----------------------------------------------------------


def test_unwrap_and_is_wrapped_see_through_torch_compile():
    model = _tiny()
    wrapped, opt = mixprec.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                                "bf16-true", master_weights=True)
    compiled = torch.compile(wrapped, backend="eager")
    train(compiled, opt, steps=2)
    assert mixprec.is_wrapped(compiled)
    masters = {n: opt.param_groups[0]["params"][i].detach().clone()
               for i, (n, _) in enumerate(wrapped.named_parameters())}
    plain = mixprec.unwrap(compiled)
    assert plain is model and not mixprec.is_wrapped(plain)
    for n, p in plain.named_parameters():  # the fp32 master values, not the bf16 weights
        assert p.dtype is torch.float32 and torch.equal(p, masters[n]), n


def test_wrapping_a_compiled_wrapped_model_is_refused():
    model = _tiny()
    compiled = torch.compile(mixprec.wrap(model, mode="bf16-true"), backend="eager")
    with pytest.raises(mixprec.exceptions.AlreadyWrappedError,
                       match="This model is already wrapped"):
        mixprec.wrap(compiled, mode="16-true")
    assert all(p.dtype is torch.bfloat16 for p in model.parameters())


# -- optimizer state loaded into the plain optimizer before wrap ---------------------------------


def _saved_and_loaded(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_optimizer_state_loaded_before_wrap_resumes_the_loss_scale_and_counters():
    options = {"init_scale": 2.0**18}  # overflows at first: the scale moves before the save
    model = _tiny()
    model, opt = mixprec.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                              "16-mixed", **options)
    train(model, opt, steps=5)
    scale, steps, skipped = opt.precision.loss_scale, opt.precision.steps, \
        opt.precision.skipped_steps
    assert scale < 2.0**18 and 0 < skipped < steps  # some steps were taken, some skipped
    saved_model, saved_opt = _saved_and_loaded((model.state_dict(), opt.state_dict()))
    want = train(model, opt, steps=3, start=5)

    fresh = TinyNet()
    fresh.load_state_dict(saved_model)
    plain_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    plain_opt.load_state_dict(saved_opt)  # torch's own load, before wrap
    fresh, fresh_opt = mixprec.wrap(fresh, plain_opt, "16-mixed", **options)
    assert (fresh_opt.precision.loss_scale, fresh_opt.precision.steps,
            fresh_opt.precision.skipped_steps) == (scale, steps, skipped)
    assert all("mixprec" not in g for g in fresh_opt.param_groups)
    assert train(fresh, fresh_opt, steps=3, start=5) == want


def test_optimizer_state_of_another_mode_loaded_before_wrap_is_refused():
    model = _tiny()
    model, opt = mixprec.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                              "16-mixed")
    train(model, opt, steps=2)
    saved = _saved_and_loaded(opt.state_dict())
    fresh = _tiny()
    plain_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    plain_opt.load_state_dict(saved)
    with pytest.raises(mixprec.exceptions.CheckpointError, match=r"'16-mixed'.*'bf16-true'"):
        mixprec.wrap(fresh, plain_opt, "bf16-true")
    assert not mixprec.is_wrapped(fresh)
    assert all(p.dtype is torch.float32 for p in fresh.parameters())
