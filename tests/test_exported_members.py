from __future__ import annotations

import re
from pathlib import Path

import mixprec
from mixprec import hookspecs

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_all_is_exactly_what_the_readme_promises():
    section = README.split("## Public API", 1)[1]
    promised = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", section.split("\n## ", 1)[0]))
    promised.discard("mixprec")
    assert set(mixprec.__all__) == promised
    for name in mixprec.__all__:
        assert hasattr(mixprec, name), name


def test_every_hook_is_documented_and_tested():
    hooks = [n for n in dir(hookspecs) if n.startswith("mixprec_")]
    assert hooks
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for hook in hooks:
        assert f"`{hook}()`" in README, f"hook {hook} is not documented in the README"
        assert getattr(hookspecs, hook).__doc__, f"hook {hook} has no contract docstring"
        assert f"def {hook}" in tests, f"hook {hook} has no test implementing it"
