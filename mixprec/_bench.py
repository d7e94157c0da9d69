"""``mixprec bench`` (being written): train a small model under every installed mode."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", default=None)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("mixprec bench is not implemented yet")
