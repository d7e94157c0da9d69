"""The conformance kit: the core modes pass it, and broken modes fail it with
messages naming the contract and the fix."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import pickle
import re
import threading
import types
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import mixprec
from mixprec.exceptions import ModeOptionError
from mixprec.testing import (
    CONTRACTS,
    ConformanceNet,
    ContractViolation,
    ModeConformance,
    assert_state_equal,
    checkpoint_roundtrip,
    seeded,
    train_steps,
    wrap_quietly,
)
from mixprec.testing._helpers import Snapshot, default_batch

pytest_plugins = ["pytester"]


class Test32True(ModeConformance):
    mode = "32-true"


class Test64True(ModeConformance):
    mode = "64-true"
    output_dtype = torch.float64


class Test16Mixed(ModeConformance):
    mode = "16-mixed"


class TestBf16Mixed(ModeConformance):
    mode = "bf16-mixed"


class Test16True(ModeConformance):
    mode = "16-true"


class TestBf16True(ModeConformance):
    mode = "bf16-true"


class Test16TrueMasterWeights(ModeConformance):
    mode = "16-true"
    options: ClassVar[dict[str, Any]] = {"master_weights": True}
    meta_init = "to_empty"  # the other way to give a meta-built model its weights


class TestBf16TrueMasterWeights(ModeConformance):
    mode = "bf16-true"
    options: ClassVar[dict[str, Any]] = {"master_weights": True}


@pytest.mark.gpu
class TestBf16MixedOnCuda(ModeConformance):
    """The kit on a GPU (skips itself without CUDA)."""

    mode = "bf16-mixed"
    device = "cuda"


@pytest.mark.gpu
class Test16MixedOnCuda(ModeConformance):
    mode = "16-mixed"
    device = "cuda"


# -- broken modes fail the check of the contract they break ------------------------------------


def _plugin(*specs: mixprec.ModeSpec, name: str = "broken_plugin") -> types.ModuleType:
    module = types.ModuleType(name)

    @mixprec.hookimpl
    def mixprec_modes():
        return list(specs)

    module.mixprec_modes = mixprec_modes
    return module


def _violation(case: type[ModeConformance], check: str) -> ContractViolation:
    with pytest.raises(ContractViolation) as info:
        getattr(case(), check)()
    err = info.value
    assert str(err).startswith(f"mixprec contract '{err.contract}' ({CONTRACTS[err.contract]}) broken")
    assert err.fix and f"Fix: {err.fix}" in str(err)
    return err


class _InPlaceScale(mixprec.PrecisionMode):
    """Rescales the weights in place: a failed wrap cannot undo it."""

    name = "inplace-scale"

    def convert_module(self, module):
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(0.5)
        return ["halved every parameter"]


def test_in_place_conversion_breaks_atomic_wrap():
    class Case(ModeConformance):
        mode = _InPlaceScale

    err = _violation(Case, "test_wrap_is_atomic_when_convert_module_fails")
    assert err.contract == "atomic wrap" and err.mode == "_InPlaceScale"
    assert "parameter 'fc1.weight' changed value" in err.problem
    assert "instead of writing into existing tensors in place" in err.fix


def _backward_pre_hook(module, grad_output):
    return None


class _HooksAndAttributes(mixprec.TruePrecision):
    """Registers a backward pre-hook, makes a buffer non-persistent and sets a plain
    attribute (as a layer-swapping plugin might), all through torch's public API."""

    def __init__(self):
        super().__init__("bf16")

    def convert_module(self, module):
        lines = super().convert_module(module)
        module.fc1.register_full_backward_pre_hook(_backward_pre_hook)
        module.register_buffer("out_scale", module.out_scale, persistent=False)
        module.is_converted = True
        return lines


def test_a_failed_wrap_restores_hooks_buffer_persistence_and_attributes():
    class Case(ModeConformance):
        mode = _HooksAndAttributes

    Case().test_wrap_is_atomic_when_convert_module_fails()


def test_snapshots_name_every_kind_of_leftover():
    torch.manual_seed(0)
    model = ConformanceNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(2, 32)).sum().backward()
    opt.step()
    snapshot = Snapshot.take(model, opt)
    assert snapshot.differences(model, opt) == []
    _HooksAndAttributes().convert_module(model)  # bf16 cast, hook, buffer, attribute
    model.fc2.weight.requires_grad_(False)
    with torch.no_grad():
        model.fc2.bias.data = model.fc2.bias.data.float()
        model.fc2.bias.mul_(2)  # in place
    opt.state[model.fc1.bias]["exp_avg"] = opt.state[model.fc1.bias]["exp_avg"] + 1
    opt.param_groups[0]["lr"] = 0.5
    model.norm = torch.nn.LayerNorm(64)
    assert snapshot.differences(model, opt) == [
        "module '<root>' gained attributes ['is_converted']",
        "module '<root>' _non_persistent_buffers_set changed (0 entries before, 1 now)",
        "module 'fc1' _backward_pre_hooks changed (0 entries before, 1 now)",
        "module 'norm' is a different object (LayerNorm, was LayerNorm)",
        "parameter 'fc1.weight' has dtype torch.bfloat16, was torch.float32",
        "parameter 'fc1.bias' has dtype torch.bfloat16, was torch.float32",
        "parameter 'norm.weight' is a different object",
        "parameter 'norm.weight' changed value",
        "parameter 'norm.weight' has a different .grad",
        "parameter 'norm.bias' is a different object",
        "parameter 'norm.bias' changed value",
        "parameter 'norm.bias' has a different .grad",
        "parameter 'fc2.weight' has dtype torch.bfloat16, was torch.float32",
        "parameter 'fc2.weight' has requires_grad=False, was True",
        "parameter 'fc2.bias' changed value",
        "buffer 'out_scale' has dtype torch.bfloat16, was torch.float32",
        "model.state_dict() has other keys than before",
        "optimizer param group 0 hyperparameters changed",
        "optimizer state of parameter 'fc1.bias' changed",
    ]


def _record_grad_amax(module, inputs, output):
    def record(grad):
        module.grad_amax.copy_(grad.abs().amax())

    if output.requires_grad:
        output.register_hook(record)


class _AmaxHistory(mixprec.TruePrecision):
    """Tracks the output gradients' amax in a buffer, also on overflowing steps (as
    an FP8 recipe would), so an inf reaches the model state."""

    def __init__(self):
        super().__init__("32")
        self.name = "amax-history"

    def convert_module(self, module):
        lines = super().convert_module(module)
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                sub.register_buffer("grad_amax", torch.zeros(()))
                sub.register_forward_hook(_record_grad_amax)
        return [*lines, "recording gradient amax of every Linear"]


def test_state_updated_from_non_finite_gradients_breaks_no_poisoned_weights():
    class Case(ModeConformance):
        mode = _AmaxHistory

    err = _violation(Case, "test_overflow_step_is_skipped_without_poisoning")
    assert err.contract == "no poisoned weights"
    assert "inf/NaN after the skipped step" in err.problem and "fc1.grad_amax" in err.problem
    assert "must ignore non-finite values" in err.fix


class _DecayingStep(mixprec.TruePrecision):
    """Decays the learning rate inside the step with a counter it does not save."""

    def __init__(self):
        super().__init__("32")
        self.name = "decaying-step"
        self.calls = 0

    @contextlib.contextmanager
    def optimizer_step_context(self, optimizer):
        self.calls += 1
        saved = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] / self.calls
        try:
            yield
        finally:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr


def test_state_missing_from_the_checkpoint_breaks_exact_resume():
    class Case(ModeConformance):
        mode = _DecayingStep

    err = _violation(Case, "test_resume_is_exact")
    assert err.contract == "exact resume"
    assert "not bit-identical" in err.problem and "model.fc1.weight: values differ" in err.problem
    assert "PrecisionMode.state_dict()/load_state_dict()" in err.fix


class _Opaque:
    """Not a plain value: torch.load(weights_only=True) refuses it."""


class _OpaqueState(mixprec.TruePrecision):
    def __init__(self):
        super().__init__("32")
        self.name = "opaque-state"

    def state_dict(self):
        return {"info": _Opaque()}


def test_checkpoints_must_load_with_weights_only():
    class Case(ModeConformance):
        mode = _OpaqueState

    err = _violation(Case, "test_resume_is_exact")
    assert "does not load with weights_only=True" in err.problem
    assert "plain Python values" in err.fix


class _Bf16Outputs(mixprec.TruePrecision):
    """bf16-true that forgets to give outputs back in fp32."""

    def __init__(self):
        super().__init__("bf16")

    def convert_output(self, data):
        return data


def test_low_precision_outputs_break_the_output_dtype():
    class Case(ModeConformance):
        mode = _Bf16Outputs

    err = _violation(Case, "test_outputs_have_the_documented_dtype_and_values")
    assert err.contract == "output dtype"
    assert "returned torch.bfloat16 outputs, expected torch.float32" in err.problem
    assert "convert_output()" in err.fix


class _WrongValues(mixprec.TruePrecision):
    def __init__(self):
        super().__init__("32")
        self.name = "wrong-values"

    def convert_output(self, data):
        return mixprec.apply_to_float_tensors(data, lambda t: t * 2)


def test_outputs_far_from_the_fp32_model_are_reported():
    class Case(ModeConformance):
        mode = _WrongValues

    err = _violation(Case, "test_outputs_have_the_documented_dtype_and_values")
    assert "differ from the unwrapped fp32 model by 1 (relative norm)" in err.problem


class _SilentCast(mixprec.TruePrecision):
    """Casts to bf16 but says nothing about it."""

    def __init__(self):
        super().__init__("bf16")

    def convert_module(self, module):
        super().convert_module(module)
        return []


def test_an_unreported_conversion_breaks_honest_conversions():
    class Case(ModeConformance):
        mode = _SilentCast

    err = _violation(Case, "test_summary_shows_what_the_mode_changed")
    assert err.contract == "honest conversions"
    assert "parameter 'fc1.weight' has dtype torch.bfloat16, was torch.float32" in err.problem
    assert "returned no summary lines" in err.problem


class _NoInitDtype(mixprec.TruePrecision):
    """bf16 parameters, but init_module builds the model in fp32."""

    def __init__(self):
        super().__init__("bf16")

    def init_context(self, device=None):
        return contextlib.nullcontext()


class _LeakyInitDtype(mixprec.TruePrecision):
    """Sets the default dtype but does not restore it when the block raises."""

    def __init__(self):
        super().__init__("bf16")

    @contextlib.contextmanager
    def init_context(self, device=None):
        torch.set_default_dtype(torch.bfloat16)
        yield
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize(("mode", "problem", "fix"), [
    (_NoInitDtype, "parameters built under init_module: fc1.weight is torch.float32, expected "
     "torch.bfloat16; fc1.bias is torch.float32",
     "Set the default dtype in init_context()"),
    (_LeakyInitDtype, "the default dtype is torch.bfloat16 after an error inside the init_module "
     "block, was torch.float32", "in a finally: block"),
])
def test_init_module_dtype_and_its_restoration_are_checked(mode, problem, fix):
    class Case(ModeConformance):
        pass

    Case.mode = mode
    err = _violation(Case, "test_init_module_builds_in_the_modes_dtype")
    assert err.contract == "init_module" and problem in err.problem and fix in err.fix
    assert torch.get_default_dtype() is torch.float32  # the kit put it back


class _HoldsALock(mixprec.TruePrecision):
    def __init__(self):
        super().__init__("bf16")
        self.lock = threading.Lock()


def test_unpicklable_mode_state_breaks_copies():
    class Case(ModeConformance):
        mode = _HoldsALock

    err = _violation(Case, "test_deepcopy_pickle_and_torch_save")
    assert err.contract == "copies"
    assert err.problem.startswith("copy.deepcopy of the wrapped model failed: TypeError")
    assert "no lambdas, locks" in err.fix


class _RenamesWeights(mixprec.PrecisionMode):
    """Moves each Linear's weight to another attribute name: the optimizer loses it."""

    name = "renames-weights"

    def convert_module(self, module):
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                sub.w = torch.nn.Parameter(sub.weight.detach().clone())
                del sub.weight
                sub.register_buffer("weight", sub.w.detach())
        return ["moved Linear weights to .w"]


def test_parameters_lost_by_the_optimizer_are_reported():
    class Case(ModeConformance):
        mode = _RenamesWeights

    err = _violation(Case, "test_trains_and_the_optimizer_holds_the_trainable_parameters")
    assert err.contract == "training"
    assert "the optimizer has 1 groups and steps 4 tensors; the model has 6 trainable" in err.problem
    assert "Keep a replaced parameter at the same dotted name" in err.fix


def test_a_mode_the_audit_finds_parameters_outside_the_optimizer_of_is_reported():
    class Case(ModeConformance):
        mode = _RenamesWeights

    err = _violation(Case, "test_audit_monitor_and_doctor_examine_the_mode")
    assert err.contract == "examined"
    assert "the audit found 2 trainable parameter(s) are not in the optimizer" in err.problem


class _NoStep(mixprec.TruePrecision):
    """Sets the learning rate to 0 inside every step."""

    def __init__(self):
        super().__init__("32")
        self.name = "no-step"

    @contextlib.contextmanager
    def optimizer_step_context(self, optimizer):
        saved = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        try:
            yield
        finally:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr


def test_a_mode_that_stops_training_is_reported_unless_declared():
    class Case(ModeConformance):
        mode = _NoStep

    err = _violation(Case, "test_trains_and_the_optimizer_holds_the_trainable_parameters")
    assert err.contract == "training" and "expected a fall of at least 10%" in err.problem
    assert "set trainable = False" in err.fix

    class Declared(Case):
        trainable = False

    Declared().test_trains_and_the_optimizer_holds_the_trainable_parameters()


class _BadUnwrap(mixprec.TruePrecision):
    def __init__(self):
        super().__init__("32")
        self.name = "bad-unwrap"

    def unwrap_module(self, module):
        raise RuntimeError("cannot dequantize")


def test_a_failing_unwrap_is_reported():
    class Case(ModeConformance):
        mode = _BadUnwrap

    err = _violation(Case, "test_unwrap_gives_a_plain_module")
    assert err.contract == "unwrap" and "RuntimeError: cannot dequantize" in err.problem


class _Quantized(mixprec.TruePrecision):
    """Takes a ``group_size`` option, but checks it only while converting."""

    def __init__(self, *, group_size: int = 64):
        super().__init__("32")
        self.name = "late-check"
        self.group_size = group_size

    def options(self):
        return {} if self.group_size == 64 else {"group_size": self.group_size}

    def convert_module(self, module):
        lines = super().convert_module(module)
        if self.group_size % 16:
            raise ModeOptionError(f"group_size must be a multiple of 16, got {self.group_size}.")
        return lines


class _Plain(mixprec.PrecisionMode):
    """No name of its own: the registry gives it the registered one."""


def _ignores_options(**options):
    return _Plain()


def test_options_are_checked_before_anything_changes():
    class Late(ModeConformance):
        mode = "late-check"
        plugin = _plugin(mixprec.ModeSpec("late-check", _Quantized, "checks options late"))
        bad_options: ClassVar[list[Any]] = [({"group_size": 7}, ModeOptionError)]

    err = _violation(Late, "test_bad_options_are_clear_errors_raised_before_any_change")
    assert err.contract == "clear errors"
    assert "was refused only inside convert_module() (group_size must be a multiple" in err.problem
    assert "Check in the factory or validate()" in err.fix

    class Silent(ModeConformance):
        mode = "silent"
        plugin = _plugin(mixprec.ModeSpec("silent", _ignores_options, "ignores its options"))

    err = _violation(Silent, "test_bad_options_are_clear_errors_raised_before_any_change")
    assert err.problem == "options {'mixprec_conformance_no_such_option': 1} was accepted silently."
    assert "explicit keyword-only parameters instead of **kwargs" in err.fix


def test_registration_problems_are_named():
    class Renamed(ModeConformance):
        mode = "renamed"
        plugin = _plugin(mixprec.ModeSpec("renamed", lambda: _OpaqueState(), "builds another name"))

    err = _violation(Renamed, "test_mode_is_registered_with_a_summary")
    assert err.contract == "registration"
    assert "the factory of 'renamed' built modes named ['opaque-state']" in err.problem

    class TwoLines(ModeConformance):
        mode = "two-lines"
        plugin = _plugin(mixprec.ModeSpec("two-lines", _ignores_options, "first\nsecond"))

    err = _violation(TwoLines, "test_mode_is_registered_with_a_summary")
    assert "the summary of 'two-lines' is 'first\\nsecond'" in err.problem


def test_a_mode_needing_a_newer_plugin_api_is_reported_with_the_reason():
    class Future(ModeConformance):
        mode = "from-the-future"
        plugin = _plugin(mixprec.ModeSpec("from-the-future", _ignores_options, "needs API 2",
                                          api_version=mixprec.PLUGIN_API_VERSION + 1))

    with pytest.raises(mixprec.exceptions.UnknownModeError):
        Future().test_mode_is_registered_with_a_summary()  # the factory cannot even be built
    reg = mixprec.Registry(entry_points=False)
    reg.register(Future.plugin, name="future")
    assert "from-the-future" not in reg.modes()
    assert reg.broken() == {"future:from-the-future": (
        f"mode 'from-the-future' needs plugin API {mixprec.PLUGIN_API_VERSION + 1}, this mixprec "
        f"{mixprec.__version__} has {mixprec.PLUGIN_API_VERSION}: upgrade mixprec")}


def test_a_heavy_import_in_the_entry_point_module_is_reported(tmp_path, monkeypatch):
    (tmp_path / "heavy_plugin.py").write_text(
        "import wave  # stands in for a heavy library\n"
        "import mixprec\n\n"
        "@mixprec.hookimpl\n"
        "def mixprec_modes():\n"
        "    return [mixprec.ModeSpec('heavy', lambda: mixprec.TruePrecision('32'), 'imports early')]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    heavy_plugin = importlib.import_module("heavy_plugin")

    class Heavy(ModeConformance):
        mode = "heavy"
        plugin = heavy_plugin
        heavy_imports = ("wave",)

    err = _violation(Heavy, "test_entry_point_module_is_cheap")
    assert err.problem == "importing heavy_plugin and calling its mixprec_modes() imported wave."
    assert "Import the heavy library inside the mode factory" in err.fix


# -- helpers for a plugin's own tests ------------------------------------------------------
# (before the pytester runs below: an in-process run unloads the torch modules it imported
# lazily, and torch refuses to import some of them twice)


def test_seeded_builds_the_same_weights_every_call():
    first, again = seeded(ConformanceNet, seed=3), seeded(ConformanceNet, seed=3)
    assert_state_equal(first.state_dict(), again.state_dict())
    other = seeded(ConformanceNet, 32, hidden=64, seed=4)  # arguments go to the factory
    with pytest.raises(AssertionError, match=r"the states differ: fc1.weight: values differ"):
        assert_state_equal(first.state_dict(), other.state_dict())


def test_assert_state_equal_says_where_states_differ():
    state = {"w": torch.ones(2), "opt": {"step": 3, "m": torch.zeros(2)}}
    assert_state_equal(state, checkpoint_roundtrip(state))
    cases = [
        ({"opt": state["opt"], "w": state["w"]}, "<root>: the same keys in another order"),
        ({"w": torch.ones(2, dtype=torch.float64), "opt": state["opt"]},
         "w: torch.float64(2,) instead of torch.float32(2,)"),
        ({"w": state["w"], "opt": {"step": 4, "m": torch.zeros(2)}}, "opt.step: 4 instead of 3"),
        ({"w": state["w"]}, "keys differ (missing ['opt'], unexpected [])"),
    ]
    for got, where in cases:
        with pytest.raises(AssertionError) as info:
            assert_state_equal(state, got)
        assert where in str(info.value)


def test_checkpoint_roundtrip_loads_with_weights_only():
    with pytest.raises(pickle.UnpicklingError):
        checkpoint_roundtrip({"state": _Opaque()})


def test_train_steps_walks_the_micro_batches_and_backpropagates_through_the_wrapper():
    model = seeded(ConformanceNet)
    model, opt = mixprec.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), "16-mixed")
    seen: list[int] = []

    def loss_at(index: int) -> torch.Tensor:
        seen.append(index)
        x, y = default_batch(index, 8, 32)
        return torch.nn.functional.mse_loss(model(x), y)

    losses = train_steps(opt, loss_at, 2, start=1, accumulate=3)
    assert seen == [3, 4, 5, 6, 7, 8] and len(losses) == 2
    assert opt.precision.loss_scale is not None  # gradients went through opt.backward


def test_train_steps_with_a_plain_optimizer_and_with_every_parameter_frozen():
    model = seeded(ConformanceNet)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.fc1.weight.detach().clone()
    x, y = default_batch(0, 8, 32)
    train_steps(opt, lambda i: torch.nn.functional.mse_loss(model(x), y), 1)
    assert not torch.equal(before, model.fc1.weight)
    model.requires_grad_(False)  # no gradient: no backward, the step still runs
    assert len(train_steps(opt, lambda i: torch.nn.functional.mse_loss(model(x), y), 2)) == 2


class _Warns(mixprec.TruePrecision):
    """Warns twice while converting, as a mode that freezes weights would."""

    def __init__(self):
        super().__init__("32")

    def convert_module(self, module):
        warnings.warn("Mode 'warns' froze 2 Linear weights", mixprec.MixprecWarning, stacklevel=2)
        warnings.warn("another note", mixprec.MixprecWarning, stacklevel=2)
        return super().convert_module(module)


@pytest.mark.parametrize(("silence", "left"), [("", []), (".*froze", ["another note"])])
def test_wrap_quietly_silences_only_the_matching_mixprec_warnings(silence, left):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = wrap_quietly(seeded(ConformanceNet), None, _Warns(), silence=silence)
    assert mixprec.is_wrapped(model)
    assert [str(w.message) for w in caught] == left


# -- the pytest plugin: opt-in, fixtures, what a failing run shows -----------------------------

_INNER = '''
import mixprec
import pytest
import torch
from mixprec.testing import ModeConformance

SEEN = []


class Extra(mixprec.PrecisionMode):
    pass


@mixprec.hookimpl
def mixprec_modes():
    return [mixprec.ModeSpec("extra", Extra, "a mode registered by hand")]


class NoFp32Outputs(mixprec.TruePrecision):
    def __init__(self):
        super().__init__("16")

    def convert_output(self, data):
        return data


class TestBf16Mixed(ModeConformance):
    mode = "bf16-mixed"


class TestBroken(ModeConformance):
    mode = NoFp32Outputs


def test_fresh_registry_with_a_plugin(mixprec_registry, register_mixprec_plugin):
    assert mixprec.registry() is mixprec_registry
    assert "extra" not in mixprec_registry.modes()
    register_mixprec_plugin(__import__(__name__), name="extra-plugin")
    assert mixprec_registry.modes()["extra"].provider == "extra-plugin"
    SEEN.append(mixprec_registry)


def test_registration_fails_after_registering(mixprec_registry, register_mixprec_plugin):
    register_mixprec_plugin(__import__(__name__), name="extra-plugin")
    SEEN.append(mixprec_registry)
    raise RuntimeError("the test fails after registering")


def test_plugins_were_unregistered_after_each_test():
    assert len(SEEN) == 2 and all("extra" not in reg.modes() for reg in SEEN)
    assert mixprec.registry() not in SEEN
'''


def test_the_kit_runs_as_an_opt_in_pytest_plugin(pytester):
    pytester.makeconftest('pytest_plugins = ["mixprec.testing"]\n')
    pytester.makepyfile(test_inner=_INNER)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rfs")
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] == 2, result.stdout.str()
    result.stdout.fnmatch_lines([
        "FAILED test_inner.py::TestBroken::test_outputs_have_the_documented_dtype_and_values*",
        "FAILED test_inner.py::test_registration_fails_after_registering*",
    ])
    # a contract violation shows its message alone, not the kit's source
    result.stdout.fnmatch_lines([
        "_* TestBroken.test_outputs_have_the_documented_dtype_and_values _*",
        "mixprec contract 'output dtype' (docs/plugin-guide.md#output-dtype) broken by mode "
        "'NoFp32Outputs': the wrapped model returned torch.float16 outputs, expected "
        "torch.float32. Fix: Convert outputs back in convert_output()*",
        "_* test_registration_fails_after_registering _*",
    ])
    n_checks = len([n for n in dir(ModeConformance) if n.startswith("test_")])
    # core modes have no plugin module to probe for heavy imports; a mode object has no
    # string to try an unknown option on
    assert outcomes["skipped"] == 3
    assert outcomes["passed"] == 2 * n_checks - 3 - 1 + 2


def test_the_kit_is_not_loaded_into_other_pytest_runs(pytester):
    pytester.makepyfile(test_other="def test_uses_the_fixture(mixprec_registry):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'mixprec_registry' not found*"])
    pytest11 = [ep.value for ep in importlib.metadata.entry_points(group="pytest11")]
    assert not any(v.startswith("mixprec") for v in pytest11)


_PLUGIN = '''
import mixprec


class Extra(mixprec.PrecisionMode):
    pass


@mixprec.hookimpl
def mixprec_modes():
    return [mixprec.ModeSpec("extra", Extra, "a mode of the plugin under test")]
'''

_PLUGIN_CONFTEST = '''
import extra_plugin
import pytest

pytest_plugins = ["mixprec.testing"]


@pytest.fixture
def mixprec_plugins():
    return {"mixprec-extra": extra_plugin}
'''

_PLUGIN_TESTS = '''
import mixprec
import pytest
import torch

SEEN = []


def test_every_test_runs_in_a_fresh_registry_with_the_plugin():
    assert mixprec.registry().modes()["extra"].provider == "mixprec-extra"
    SEEN.append(mixprec.registry())


def test_the_fixture_is_that_registry(mixprec_registry):
    assert mixprec.registry() is mixprec_registry
    SEEN.append(mixprec_registry)


def test_fails_with_the_plugin_registered():
    SEEN.append(mixprec.registry())
    raise RuntimeError("the test fails")


def test_the_plugin_was_unregistered_after_each_test():
    assert len({id(reg) for reg in SEEN}) == 3
    assert all("extra" not in reg.modes() for reg in SEEN)


@pytest.mark.gpu
def test_on_a_gpu():
    assert torch.cuda.is_available()
'''


def test_a_conftest_names_its_plugin_once_for_every_test(pytester):
    pytester.syspathinsert()
    pytester.makepyfile(extra_plugin=_PLUGIN, test_plugin=_PLUGIN_TESTS)
    pytester.makeconftest(_PLUGIN_CONFTEST)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rfs", "--strict-markers")
    gpu = torch.cuda.is_available()
    result.assert_outcomes(passed=3 + gpu, failed=1, skipped=1 - gpu)
    result.stdout.fnmatch_lines(["FAILED test_plugin.py::test_fails_with_the_plugin_registered*"])
    if not gpu:
        result.stdout.fnmatch_lines(["SKIPPED*marked gpu: needs a CUDA GPU, and torch sees none"])


# -- the plugin-author guide documents the interface and the kit -----------------------------

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "plugin-guide.md"


def _public(cls: type) -> list[str]:
    return [n for n in dir(cls) if not n.startswith("_")]


def test_the_plugin_guide_documents_every_hook_mode_method_and_kit_check():
    text = GUIDE.read_text()
    hooks = [n for n in vars(mixprec.hookspecs) if n.startswith("mixprec_")]
    assert hooks == ["mixprec_modes"]
    expected = {
        "hook": [f"### `{h}()" for h in hooks],
        "ModeSpec field": [f"| `{f}` |" for f in mixprec.ModeSpec.__dataclass_fields__],
        "PrecisionMode member": [f"`{n}" for n in _public(mixprec.PrecisionMode)],
        "OptimizerMode member": [f"`{n}" for n in _public(mixprec.OptimizerMode)],
        "kit check": [f"| `{n}` |" for n in _public(ModeConformance) if n.startswith("test_")],
        "kit attribute": [f"`{n}`" for n in _public(ModeConformance)
                          if not n.startswith(("test_", "make_", "compute_", "mode_label"))],
        "kit hook": [f"`{n}(self" for n in _public(ModeConformance)
                     if n.startswith(("make_", "compute_"))],
        "fixture": [f"`{n}" for n in ("mixprec_plugins", "mixprec_registry",
                                      "register_mixprec_plugin")],
        "helper": [f"`{n}(" for n in ("seeded", "train_steps", "checkpoint_roundtrip",
                                      "wrap_quietly", "assert_state_equal")],
    }
    missing = {what: [m for m in marks if m not in text] for what, marks in expected.items()}
    assert {k: v for k, v in missing.items() if v} == {}
    assert "`mixprec.PLUGIN_API_VERSION`" in text and "`ModeSpec.api_version`" in text


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (code blocks skipped)."""
    anchors: set[str] = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"#{1,6} (.+)", line)):
            base = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchor, n = base, 0
            while anchor in anchors:
                n += 1
                anchor = f"{base}-{n}"
            anchors.add(anchor)
    return anchors


def test_every_contract_links_to_the_heading_of_the_guide_that_states_it():
    anchors = _anchors(GUIDE.read_text())
    for contract, link in CONTRACTS.items():
        path, _, anchor = link.partition("#")
        assert path == "docs/plugin-guide.md" and anchor in anchors, (contract, link)
    # the guide's own links to its headings resolve too
    internal = re.findall(r"\]\(#([^)]+)\)", GUIDE.read_text())
    assert internal and [a for a in internal if a not in anchors] == []


# Generated or installed files (caches, build outputs, environments) are not the repository's.
_NOT_SOURCES = {".git", ".tox", ".venv", "__pycache__", "build", "dist", "bench-results",
                ".pytest_cache", ".ruff_cache", ".mypy_cache"}


def test_no_file_refers_to_a_design_document_that_does_not_exist():
    missing = "design" + ".md"  # spelt apart, so this file does not name it
    assert not (REPO / missing).exists()
    mentions = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames
                       if d not in _NOT_SOURCES and not d.endswith(".egg-info")]
        for filename in filenames:
            path = Path(dirpath, filename)
            if missing in path.read_bytes().decode("utf-8", "replace"):
                mentions.append(str(path.relative_to(REPO)))
    assert mentions == []
