"""Which ``nn.Linear`` layers go to FP8, and why the others stay.

Pure bookkeeping over module names, kept apart from the conversion so that
``validate`` can compute the whole plan (and raise) before anything changes.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

__all__ = ["ROOT", "Fp8Plan", "display_name", "matches", "plan_fp8_layers", "unmatched_patterns"]

#: The name a module has for itself in ``named_modules()``.
ROOT = ""

#: FP8 GEMMs (``torch._scaled_mm``) need both dimensions of the weight divisible by 16.
FP8_DIM_MULTIPLE = 16

ModuleFilter = Callable[[torch.nn.Module, str], bool]


@dataclass
class Fp8Plan:
    """The layers to convert (dotted paths) and the layers that stay, with the reason."""

    convert: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)


def display_name(fqn: str) -> str:
    """A dotted path as shown to users (the root module has no name of its own)."""
    return fqn if fqn else "(the root module)"


def matches(fqn: str, pattern: str) -> bool:
    """True if module ``fqn`` is named by ``pattern``: its full dotted path, or an
    ``fnmatch`` glob of it (``"layers.*.mlp.down_proj"``; ``*`` also crosses dots).

    The same rule as mixprec-bnb's and mixprec-te's ``ignore_modules``; a pattern that
    names a parent also covers everything inside it (see :func:`plan_fp8_layers`).
    """
    if not fqn:
        return False
    return fnmatch.fnmatchcase(fqn, pattern)


def _excluding_pattern(fqn: str, patterns: Iterable[str]) -> str | None:
    """The first pattern naming ``fqn`` or one of its parents."""
    parts = fqn.split(".") if fqn else []
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if any(matches(prefix, pattern) for prefix in prefixes):
            return pattern
    return None


def unmatched_patterns(module: torch.nn.Module, patterns: Iterable[str]) -> list[tuple[str, str | None]]:
    """The patterns that name no module, each with the closest module name (or None)."""
    names = [n for n, _ in module.named_modules(remove_duplicate=False) if n]
    out = []
    for pattern in patterns:
        if not any(matches(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, names, n=1)
            out.append((pattern, close[0] if close else None))
    return out


def plan_fp8_layers(
    module: torch.nn.Module,
    *,
    ignore_modules: Iterable[str] = (),
    module_filter: ModuleFilter | None = None,
) -> Fp8Plan:
    """Decide, for every ``nn.Linear`` in ``module``, whether it goes to FP8.

    Only layers whose type is exactly ``torch.nn.Linear`` are swapped: a subclass
    may have its own forward, which ``Float8Linear`` would silently replace.
    ``module_filter(layer, fqn)`` returning False keeps a layer, as in torchao's
    ``convert_to_float8_training``.
    """
    patterns = tuple(ignore_modules)
    plan = Fp8Plan()
    for fqn, sub in module.named_modules(remove_duplicate=False):
        if not isinstance(sub, torch.nn.Linear):
            continue
        if type(sub) is not torch.nn.Linear:
            plan.kept.append((fqn, f"a subclass of nn.Linear ({type(sub).__name__}), not swapped"))
            continue
        pattern = _excluding_pattern(fqn, patterns)
        if pattern is not None:
            plan.kept.append((fqn, f"excluded by ignore_modules {pattern!r}"))
            continue
        if module_filter is not None and not module_filter(sub, fqn):
            plan.kept.append((fqn, "excluded by module_filter"))
            continue
        n_in, n_out = sub.in_features, sub.out_features
        if n_in % FP8_DIM_MULTIPLE or n_out % FP8_DIM_MULTIPLE:
            plan.kept.append(
                (fqn, f"in_features={n_in}, out_features={n_out}: FP8 needs both divisible "
                      f"by {FP8_DIM_MULTIPLE}")
            )
            continue
        plan.convert.append(fqn)
    return plan
