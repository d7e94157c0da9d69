from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

import mixprec
from mixprec.exceptions import (
    DuplicateModeError,
    MissingDependencyError,
    ModeOptionError,
    ModeSyntaxError,
    PluginError,
    UnknownModeError,
)

CORE = {"16-mixed", "16-true", "32-true", "64-true", "bf16-mixed", "bf16-true"}


def _plugin(*specs, name="plug"):
    module = types.ModuleType(name)

    @mixprec.hookimpl
    def mixprec_modes():
        return list(specs)

    module.mixprec_modes = mixprec_modes
    return module


class Noop(mixprec.PrecisionMode):
    def __init__(self, *, factor: float = 1.0):
        self.factor = factor


class NoopOptimizer(mixprec.OptimizerMode):
    name = "noop-optim"


def test_core_modes_register_through_the_hook(fresh_registry):
    modes = fresh_registry.modes()
    assert set(modes) == CORE
    assert {e.provider for e in modes.values()} == {"mixprec"}


def test_unknown_mode_lists_available_and_suggests(fresh_registry):
    with pytest.raises(UnknownModeError) as info:
        fresh_registry.entry("bf16-mixd")
    err = info.value
    assert "Did you mean 'bf16-mixed'?" in str(err)
    assert err.available == sorted(CORE) and err.provider is None
    assert "Available: 16-mixed, 16-true, 32-true, 64-true, bf16-mixed, bf16-true." in str(err)


@pytest.mark.parametrize(("mode", "dist"), [("nf4-dq", "mixprec-bnb"), ("paged-adamw8bit", "mixprec-bnb"),
                                            ("transformer-engine", "mixprec-te"),
                                            ("fp8-rowwise", "mixprec-torchao"),
                                            ("ao-adamw4bit", "mixprec-torchao")])
def test_first_party_modes_that_are_not_installed_name_the_pip_install(fresh_registry, mode, dist):
    with pytest.raises(UnknownModeError, match=f"provided by {dist}: pip install {dist}") as info:
        fresh_registry.entry(mode)
    assert info.value.provider == dist


def test_a_misspelt_first_party_mode_gets_both_hints(fresh_registry):
    with pytest.raises(UnknownModeError, match=r"Did you mean 'nf4'\?.*pip install mixprec-bnb"):
        fresh_registry.entry("nf5")


@pytest.mark.parametrize("spec", ["", "  ", "bf16-true++x", "BF16-true", "bf16 true", "+bf16-true",
                                  "bf16-true+"])
def test_mode_string_grammar_errors(fresh_registry, spec):
    with pytest.raises(ModeSyntaxError):
        fresh_registry.build(spec, {})


def test_two_precision_modes_or_two_optimizer_modes_are_refused(fresh_registry):
    fresh_registry.register(_plugin(mixprec.ModeSpec("noop-optim", NoopOptimizer, "x",
                                                     kind="optimizer")))
    with pytest.raises(ModeSyntaxError, match="more than one precision mode"):
        fresh_registry.build("bf16-mixed+16-mixed", {})
    with pytest.raises(ModeSyntaxError, match="two optimizer modes"):
        fresh_registry.build("bf16-mixed+noop-optim+noop-optim", {})
    precision, optimizers = fresh_registry.build("noop-optim", {})
    assert precision.name == "32-true" and [o.name for o in optimizers] == ["noop-optim"]


def test_options_are_checked_against_the_factory(fresh_registry):
    fresh_registry.register(_plugin(mixprec.ModeSpec("noop", Noop, "x")))
    assert fresh_registry.build("noop", {"factor": 2.0})[0].factor == 2.0
    with pytest.raises(ModeOptionError, match=r"does not take option 'facter'.*Did you mean 'factor'"):
        fresh_registry.build("noop", {"facter": 2.0})
    with pytest.raises(ModeOptionError, match="mode object's constructor"):
        fresh_registry.build(Noop(), {"factor": 1.0})


def test_duplicate_mode_names_name_both_distributions(fresh_registry):
    fresh_registry.register(_plugin(mixprec.ModeSpec("noop", Noop, "a"), name="a"), name="a",
                            distribution="dist-a")
    fresh_registry.register(_plugin(mixprec.ModeSpec("noop", Noop, "b"), name="b"), name="b",
                            distribution="dist-b")
    with pytest.raises(DuplicateModeError, match="dist-a, dist-b") as info:
        fresh_registry.entry("noop")
    assert info.value.providers == ["dist-a", "dist-b"]
    assert "32-true" in fresh_registry.modes()  # the others keep working
    fresh_registry.unregister("b")
    assert fresh_registry.entry("noop").provider == "dist-a"


def test_a_plugin_whose_hook_raises_is_reported_not_fatal(fresh_registry):
    module = types.ModuleType("bad")

    @mixprec.hookimpl
    def mixprec_modes():
        raise RuntimeError("boom")

    module.mixprec_modes = mixprec_modes
    fresh_registry.register(module, name="bad")
    assert "boom" in fresh_registry.broken()["bad"]
    assert set(fresh_registry.modes()) == CORE


@pytest.mark.parametrize(("exc", "reason"), [(SystemExit(3), "SystemExit: 3"),
                                             (GeneratorExit("stop"), "GeneratorExit: stop")])
def test_a_plugin_whose_hook_exits_is_reported_not_fatal(fresh_registry, exc, reason):
    module = types.ModuleType("exits")

    @mixprec.hookimpl
    def mixprec_modes():
        raise exc

    module.mixprec_modes = mixprec_modes
    fresh_registry.register(module, name="exits")
    assert fresh_registry.broken()["exits"] == f"mixprec_modes() failed: {reason}"
    assert set(fresh_registry.modes()) == CORE
    assert fresh_registry.build("bf16-mixed", {})[0].name == "bf16-mixed"


def test_a_keyboard_interrupt_in_a_hook_still_interrupts(fresh_registry):
    module = types.ModuleType("interrupted")

    @mixprec.hookimpl
    def mixprec_modes():
        raise KeyboardInterrupt

    module.mixprec_modes = mixprec_modes
    with pytest.raises(KeyboardInterrupt):
        fresh_registry.register(module, name="interrupted")


def test_a_mode_for_a_newer_plugin_api_is_reported(fresh_registry):
    fresh_registry.register(_plugin(mixprec.ModeSpec("future", Noop, "x", api_version=99)),
                            name="future", distribution="mixprec-future")
    assert "future" not in fresh_registry.modes()
    (reason,) = fresh_registry.broken().values()
    assert "needs plugin API 99" in reason and "upgrade mixprec" in reason


def test_mode_objects_and_lists_are_accepted(fresh_registry):
    fresh_registry.register(_plugin(mixprec.ModeSpec("noop-optim", NoopOptimizer, "x",
                                                     kind="optimizer")))
    precision, optimizers = fresh_registry.build([mixprec.TruePrecision("bf16"), "noop-optim"], {})
    assert precision.name == "bf16-true" and optimizers[0].name == "noop-optim"


# -- real entry points: the tests/example_plugin distribution is installed in the env --


def test_an_installed_plugin_is_discovered_through_its_entry_point():
    reg = mixprec.Registry()
    entry = reg.entry("testplugin-rounded")
    assert (entry.provider, entry.version) == ("mixprec-testplugin", "0.0.1")
    assert "broken on purpose" in reg.broken()["mixprec-testplugin-broken"]
    with mixprec.use_registry(reg):
        model = mixprec.wrap(torch.nn.Linear(4, 4), mode="testplugin-rounded")
    out = model(torch.randn(2, 4))
    assert torch.equal(out, out.to(torch.bfloat16).float())


@pytest.mark.parametrize(("value", "expected"), [(None, True), ("", False),
                                                 ("mixprec-testplugin", True),
                                                 ("some-other-dist", False)])
def test_mixprec_load_plugins_chooses_what_loads(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("MIXPREC_LOAD_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("MIXPREC_LOAD_PLUGINS", value)
    reg = mixprec.Registry()
    assert ("testplugin-rounded" in reg.modes()) is expected
    assert ("mixprec-testplugin-broken" in reg.broken()) is (value is None)
    assert CORE <= set(reg.modes())


def test_plugins_load_lazily_not_at_import():
    code = ("import sys, mixprec; "
            "assert 'mixprec_testplugin' not in sys.modules; "
            "assert not mixprec.registry()._loaded; "
            "mixprec.registry().modes(); "
            "assert 'mixprec_testplugin.plugin' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_a_misspelt_core_option_is_named_with_a_suggestion(fresh_registry):
    with pytest.raises(ModeOptionError, match=r"'bf16-true' does not take option 'master_weight'.*"
                                              r"Did you mean 'master_weights'"):
        fresh_registry.build("bf16-true", {"master_weight": True})
    with pytest.raises(ModeOptionError, match="'bf16-mixed' does not take option 'init_scale'"):
        fresh_registry.build("bf16-mixed", {"init_scale": 8.0})
    precision, _ = fresh_registry.build("16-mixed", {"init_scale": 8.0, "hysteresis": 2})
    assert precision.options() == {"init_scale": 8.0, "hysteresis": 2}


def test_a_plugin_cannot_replace_a_core_mode(fresh_registry):
    fresh_registry.register(_plugin(mixprec.ModeSpec("bf16-true", Noop, "x")), name="hijack",
                            distribution="mixprec-hijack")
    assert fresh_registry.entry("bf16-true").provider == "mixprec"
    assert "is a core mode" in fresh_registry.broken()["mixprec-hijack:bf16-true"]


# -- what a mode factory does wrong is the plugin's error, named as such --


def _register_factory(reg, factory, kind="precision"):
    reg.register(_plugin(mixprec.ModeSpec("yours-int4", factory, "x", kind=kind)), name="yours",
                 distribution="mixprec-yours", version="1.2")


def test_a_factory_that_cannot_import_its_library_is_a_plugin_error(fresh_registry):
    def factory():
        import yourlib_that_is_not_installed  # noqa: F401

    _register_factory(fresh_registry, factory)
    with pytest.raises(PluginError) as info:
        fresh_registry.build("yours-int4", {})
    err = info.value
    assert (err.plugin, err.mode, err.missing) == ("mixprec-yours", "yours-int4",
                                                  "yourlib_that_is_not_installed")
    assert str(err) == (
        "Mode 'yours-int4' of mixprec-yours cannot be built: its factory cannot import "
        "'yourlib_that_is_not_installed' (No module named 'yourlib_that_is_not_installed'); "
        "install the library that provides it, or reinstall the plugin with its dependencies: "
        "pip install --force-reinstall mixprec-yours.")
    assert isinstance(err.__cause__, ImportError)


def test_a_factory_that_returns_no_mode_is_a_plugin_error(fresh_registry):
    _register_factory(fresh_registry, lambda: 42)
    with pytest.raises(PluginError, match=r"^Mode 'yours-int4' of mixprec-yours cannot be built: "
                                          r"its factory returned int, not a PrecisionMode or "
                                          r"OptimizerMode; .*mixprec-yours") as info:
        fresh_registry.build("yours-int4", {})
    assert (info.value.plugin, info.value.mode, info.value.missing) == (
        "mixprec-yours", "yours-int4", None)


def test_a_factory_s_missing_dependency_error_and_bad_options_keep_their_errors(fresh_registry):
    def factory(*, group_size: int = 64):
        if group_size == 0:
            raise TypeError("group_size must not be 0")
        raise MissingDependencyError("Mode 'yours-int4' needs yourlib.", package="yourlib")

    _register_factory(fresh_registry, factory)
    with pytest.raises(MissingDependencyError, match="needs yourlib"):
        fresh_registry.build("yours-int4", {})
    with pytest.raises(ModeOptionError, match="rejected its options: group_size must not be 0"):
        fresh_registry.build("yours-int4", {"group_size": 0})
