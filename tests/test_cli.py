from __future__ import annotations

import subprocess
import sys

import pytest
from installed_dists import Site

import mixprec
from mixprec._cli import main


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.delenv("MIXPREC_LOAD_PLUGINS", raising=False)
    installed = Site(tmp_path, monkeypatch)
    try:
        yield installed
    finally:
        installed.close()


def test_modes_lists_every_mode_its_provider_and_broken_plugins(capsys):
    assert main(["modes"]) == 0
    out = capsys.readouterr().out
    for mode in ("32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"):
        assert f"\n{mode} " in out
    assert "testplugin-rounded" in out and "mixprec-testplugin 0.0.1" in out
    assert "broken plugins:" in out and "mixprec-testplugin-broken: ImportError" in out


def test_the_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "mixprec._cli", "modes"], capture_output=True,
                         text=True, check=True, env={"MIXPREC_LOAD_PLUGINS": "", "PATH": ""})
    assert "bf16-mixed" in out.stdout and "testplugin" not in out.stdout


def test_modes_lists_everything_when_a_plugin_exits_at_import(site, capsys):
    site.install("mixprec-exits", entry_points={"mixprec-exits": "exiting_plugin"},
                 modules={"exiting_plugin": "import sys\nsys.exit(3)\n"})
    with mixprec.use_registry(mixprec.Registry()):
        assert main(["modes"]) == 0
    out = capsys.readouterr().out
    assert "\nbf16-mixed " in out and "testplugin-rounded" in out
    assert "  mixprec-exits: SystemExit: 3\n" in out


def test_modes_names_what_mixprec_load_plugins_asks_for_but_is_not_installed(monkeypatch, capsys):
    monkeypatch.setenv("MIXPREC_LOAD_PLUGINS", "mixprec-testplugn")
    with mixprec.use_registry(mixprec.Registry()):
        assert main(["modes"]) == 0
    out = capsys.readouterr().out
    assert "testplugin-rounded" not in out
    assert ("\nMIXPREC_LOAD_PLUGINS names plugins that are not installed:\n"
            "  mixprec-testplugn: no installed distribution provides a mixprec plugin of that "
            "name; did you mean 'mixprec-testplugin'?\n") in out
