"""Loading plugins from installed distributions: which entry points load, when,
and what a plugin that misbehaves at import can do (nothing beyond itself).

The distributions here are really installed (see ``installed_dists``): a
``*.dist-info`` directory on ``sys.path``, found by ``importlib.metadata``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from installed_dists import Site, plugin_source

import mixprec
from mixprec.exceptions import UnknownModeError

CORE = {"16-mixed", "16-true", "32-true", "64-true", "bf16-mixed", "bf16-true"}
BNB_MODES = (("nf4", "precision"), ("adamw8bit", "optimizer"))


@pytest.fixture
def site(tmp_path, monkeypatch) -> Iterator[Site]:
    monkeypatch.delenv("MIXPREC_LOAD_PLUGINS", raising=False)
    installed = Site(tmp_path, monkeypatch)
    try:
        yield installed
    finally:
        installed.close()


def _install_real_bnb(site: Site, name: str = "mixprec-bnb") -> None:
    site.install(name, version="0.1.0", entry_points={"mixprec-bnb": "genuine_bnb"},
                 modules={"genuine_bnb": plugin_source(*BNB_MODES, summary="genuine")})


def _install_evil(site: Site, ep_name: str = "mixprec-bnb") -> None:
    site.install("evil-pkg", version="6.6.6", entry_points={ep_name: "evil_bnb"},
                 modules={"evil_bnb": plugin_source(*BNB_MODES, summary="evil")})


# -- item 8: entry points are matched to the distribution that declares them --


@pytest.mark.parametrize("allow", [None, "mixprec-bnb"])
def test_an_entry_point_named_after_another_distribution_is_never_loaded(site, monkeypatch, allow):
    _install_real_bnb(site)
    _install_evil(site)  # found first: it is first on sys.path
    if allow is not None:
        monkeypatch.setenv("MIXPREC_LOAD_PLUGINS", allow)
    reg = mixprec.Registry()
    assert reg.entry("nf4").spec.summary == "genuine"
    assert reg.entry("adamw8bit").provider == "mixprec-bnb"
    assert "evil_bnb" not in sys.modules
    reasons = [r for r in reg.broken().values() if "evil-pkg" in r]
    assert reasons == ["entry point 'mixprec-bnb' is declared by distribution 'evil-pkg', "
                       "not by mixprec-bnb: not loaded"]


def test_an_impostor_alone_is_not_loaded_either(site):
    _install_evil(site)
    reg = mixprec.Registry()
    with pytest.raises(UnknownModeError, match="pip install mixprec-bnb"):
        reg.entry("nf4")
    assert "evil_bnb" not in sys.modules
    assert "evil-pkg:mixprec-bnb" in reg.broken()


def test_an_entry_point_named_after_no_distribution_is_an_impostor_too(site):
    _install_evil(site, ep_name="mixprec-evil")
    reg = mixprec.Registry()
    assert "nf4" not in reg.modes() and "evil_bnb" not in sys.modules
    assert "declared by distribution 'evil-pkg', not by mixprec-evil" in reg.broken()[
        "evil-pkg:mixprec-evil"]


@pytest.mark.parametrize("allow", ["mixprec-bnb", "mixprec_bnb", "Mixprec.BNB",
                                   " mixprec-testplugin , MIXPREC__bnb "])
def test_mixprec_load_plugins_names_distributions_in_any_spelling(site, monkeypatch, allow):
    _install_real_bnb(site)
    monkeypatch.setenv("MIXPREC_LOAD_PLUGINS", allow)
    reg = mixprec.Registry()
    assert reg.entry("nf4").provider == "mixprec-bnb"


def test_a_distribution_spelt_otherwise_owns_its_entry_point(site):
    _install_real_bnb(site, name="Mixprec_BNB")
    reg = mixprec.Registry()
    assert reg.entry("nf4").provider == "Mixprec_BNB"
    assert not [k for k in reg.broken() if "bnb" in k]


# -- item 9: a plugin that exits (or raises any BaseException) at import is only broken --


@pytest.mark.parametrize(("source", "reason"), [
    ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    ("class Stop(BaseException):\n    pass\nraise Stop('no')\n", "Stop: no"),
])
def test_a_plugin_that_exits_at_import_is_reported_and_the_rest_works(site, source, reason):
    site.install("mixprec-exits", entry_points={"mixprec-exits": "exiting_plugin"},
                 modules={"exiting_plugin": source})
    reg = mixprec.Registry()
    assert reg.broken()["mixprec-exits"] == reason
    assert CORE | {"testplugin-rounded"} <= set(reg.modes())
    with mixprec.use_registry(reg):
        model = torch.nn.Linear(4, 4)
        _, opt = mixprec.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), "bf16-true")
        assert model.weight.dtype == torch.bfloat16 and opt.precision.mode_name == "bf16-true"
        mixprec.wrap(torch.nn.Linear(4, 4), mode="testplugin-rounded")


def test_a_plugin_that_exits_at_import_does_not_break_a_core_wrap(site):
    site.install("mixprec-exits", entry_points={"mixprec-exits": "exiting_plugin"},
                 modules={"exiting_plugin": "import sys\nsys.exit(3)\n"})
    with mixprec.use_registry(mixprec.Registry()):
        model = mixprec.wrap(torch.nn.Linear(4, 4), mode="bf16-mixed")
    assert model(torch.randn(2, 4)).shape == (2, 4)


# -- item 10: plugins are imported only when a plugin mode or the full listing is asked for --


def _install_sidefx(site: Site) -> None:
    site.install("mixprec-sidefx", entry_points={"mixprec-sidefx": "sidefx_plugin"},
                 modules={"sidefx_plugin": plugin_source(("sidefx-mode", "precision"))})


def test_a_core_mode_does_not_import_plugins_a_plugin_mode_does(site):
    _install_sidefx(site)
    with mixprec.use_registry(mixprec.Registry()):
        model = torch.nn.Linear(4, 4)
        mixprec.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), "bf16-mixed")
        mixprec.wrap(torch.nn.Linear(4, 4), mode="bf16-true", master_weights=True)
        assert "sidefx_plugin" not in sys.modules
        model = torch.nn.Linear(4, 4)
        _, opt = mixprec.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), "sidefx-mode")
        assert "sidefx_plugin" in sys.modules and opt.precision.mode_name == "sidefx-mode"


@pytest.mark.parametrize("listing", ["modes", "broken", "conflicts"])
def test_the_full_listing_imports_plugins(site, listing):
    _install_sidefx(site)
    reg = mixprec.Registry()
    assert reg.entry("bf16-true").provider == "mixprec"
    assert "sidefx_plugin" not in sys.modules
    getattr(reg, listing)()
    assert "sidefx_plugin" in sys.modules
    assert reg.modes()["sidefx-mode"].provider == "mixprec-sidefx"


def test_an_unknown_mode_lists_plugin_modes_too(site):
    _install_sidefx(site)
    with pytest.raises(UnknownModeError, match="Did you mean 'sidefx-mode'") as info:
        mixprec.Registry().entry("sidefx-mod")
    assert "sidefx-mode" in info.value.available


def test_a_core_wrap_in_a_fresh_interpreter_imports_no_plugin():
    code = ("import sys, torch, mixprec; "
            "mixprec.wrap(torch.nn.Linear(2, 2), mode='bf16-mixed'); "
            "print(sorted(m for m in sys.modules if m.startswith('mixprec_testplugin'))); "
            "mixprec.wrap(torch.nn.Linear(2, 2), mode='testplugin-rounded'); "
            "print('mixprec_testplugin.plugin' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


# -- item 11: what MIXPREC_LOAD_PLUGINS does is said where it matters --


def test_an_underscore_spelling_loads_an_installed_first_party_plugin(site, monkeypatch):
    _install_real_bnb(site)
    monkeypatch.setenv("MIXPREC_LOAD_PLUGINS", "mixprec_bnb")
    with mixprec.use_registry(mixprec.Registry()) as reg:
        model = torch.nn.Linear(4, 4)
        _, opt = mixprec.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), "nf4")
        assert opt.precision.mode_name == "nf4"
        assert reg.unmatched() == {}


def test_a_first_party_plugin_left_out_by_the_variable_is_not_a_pip_install(site, monkeypatch):
    _install_real_bnb(site)
    monkeypatch.setenv("MIXPREC_LOAD_PLUGINS", "mixprec-testplugin")
    reg = mixprec.Registry()
    for mode, named in (("adamw8bit", "adamw8bit"), ("nf5", "nf4")):  # a misspelling too
        with pytest.raises(UnknownModeError) as info:
            reg.entry(mode)
        message = str(info.value)
        assert "pip install" not in message
        assert (f"Mode {named!r} is provided by mixprec-bnb 0.1.0, which is installed but not "
                "loaded: MIXPREC_LOAD_PLUGINS='mixprec-testplugin' leaves it out; add "
                "mixprec-bnb to it or unset it." in message)
    assert "genuine_bnb" not in sys.modules


def test_an_unknown_mode_names_the_installed_plugins_the_variable_leaves_out(site, monkeypatch):
    _install_sidefx(site)
    monkeypatch.setenv("MIXPREC_LOAD_PLUGINS", "mixprec-testplugin")
    with pytest.raises(UnknownModeError) as info:
        mixprec.Registry().entry("sidefx-mode")
    assert str(info.value).endswith(" Installed plugins that MIXPREC_LOAD_PLUGINS leaves out: "
                                    "mixprec-sidefx, mixprec-testplugin-broken.")


def test_a_name_in_the_variable_that_matches_no_installed_plugin_is_reported(site, monkeypatch):
    _install_real_bnb(site)
    monkeypatch.setenv("MIXPREC_LOAD_PLUGINS", "mixprec-bnbb, mixprec, mixprec-testplugin, zzz")
    reg = mixprec.Registry()
    assert reg.unmatched() == {
        "mixprec-bnbb": "no installed distribution provides a mixprec plugin of that name; "
                        "did you mean 'mixprec-bnb'?",
        "zzz": "no installed distribution provides a mixprec plugin of that name; installed: "
               "mixprec-bnb, mixprec-testplugin, mixprec-testplugin-broken",
    }
    assert "testplugin-rounded" in reg.modes() and "nf4" not in reg.modes()
