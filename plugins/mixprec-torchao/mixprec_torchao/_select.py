"""Which ``nn.Linear`` layers go to FP8, and why the others stay.

Pure bookkeeping over module names, kept apart from the conversion so that
``validate`` can compute the whole plan (and raise) before anything changes.
``ignore_modules`` is matched by :func:`mixprec.utils.match_module`, the one rule of
every mode (mixprec-bnb's and mixprec-te's too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from mixprec.utils import closest_name, match_module
from mixprec.utils import unmatched_patterns as unmatched_by_any

__all__ = ["ROOT", "Fp8Plan", "display_name", "plan_fp8_layers", "unmatched_patterns"]

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


def unmatched_patterns(module: torch.nn.Module, patterns: Iterable[str]) -> list[tuple[str, str | None]]:
    """The patterns that select no module, each with the closest module name (or None)."""
    names = [n for n, _ in module.named_modules(remove_duplicate=False) if n]
    return [(pattern, closest_name(pattern, names))
            for pattern in unmatched_by_any(names, patterns)]


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
        pattern = match_module(fqn, patterns)
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
