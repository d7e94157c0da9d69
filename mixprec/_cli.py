"""The ``mixprec`` command: ``mixprec modes``, ``mixprec bench`` and ``mixprec doctor``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._registry import registry
from ._version import PLUGIN_API_VERSION, __version__

__all__ = ["main"]


def _modes(args: argparse.Namespace) -> int:
    reg = registry()
    modes = reg.modes()
    rows = [(e.name, e.spec.kind, f"{e.provider} {e.version}", e.spec.summary
             + (f" [needs {e.spec.requires}]" if e.spec.requires else ""))
            for e in modes.values()]
    header = ("mode", "kind", "provided by", "summary")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    broken = reg.broken()
    if broken:
        print("\nbroken plugins:")
        for name, reason in broken.items():
            print(f"  {name}: {reason}")
    unmatched = reg.unmatched()
    if unmatched:
        print("\nMIXPREC_LOAD_PLUGINS names plugins that are not installed:")
        for name, reason in unmatched.items():
            print(f"  {name}: {reason}")
    conflicts = reg.conflicts()
    if conflicts:
        print("\nconflicting mode names (not usable until one provider is removed):")
        for name, providers in conflicts.items():
            print(f"  {name}: {', '.join(providers)}")
    print(f"\nmixprec {__version__}, plugin API {PLUGIN_API_VERSION}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mixprec", description="Run PyTorch training in another numeric precision."
    )
    parser.add_argument("--version", action="version", version=f"mixprec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_modes = sub.add_parser("modes", help="list the installed modes and broken plugins")
    p_modes.set_defaults(func=_modes)
    p_bench = sub.add_parser(
        "bench", help="train a small built-in model under every installed mode, side by side"
    )
    from . import _bench

    _bench.add_arguments(p_bench)
    p_bench.set_defaults(func=_bench.run)
    p_doctor = sub.add_parser(
        "doctor", help="which mode a model can take and which layers to keep in full precision"
    )
    from ._doctor import cli as _doctor_cli

    _doctor_cli.add_arguments(p_doctor)
    p_doctor.set_defaults(func=_doctor_cli.run)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
