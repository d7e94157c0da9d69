"""The ``ignore_modules`` rule as a table, for every mode that takes ``ignore_modules``.

mixprec has one rule for which modules an ``ignore_modules`` entry selects
(:func:`mixprec.utils.match_module`); a mode that takes the option tests that it
leaves exactly those layers alone by wrapping :func:`ignore_modules_model` with each
row of :data:`IGNORE_MODULES_CASES` and checking the result with
:func:`assert_ignore_modules_rule` (mixprec-bnb, mixprec-te and mixprec-torchao do).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mixprec.utils import match_module

__all__ = ["IGNORE_MODULES_CASES", "IGNORE_MODULES_LINEARS", "assert_ignore_modules_rule",
           "ignore_modules_model"]

#: The Linear layers of :func:`ignore_modules_model`, by dotted name.
IGNORE_MODULES_LINEARS = ("blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.mlp.up",
                          "blocks.1.attn.q", "lm_head", "lm_head2")

#: ``(ignore_modules, the Linear layers they select)``. Every entry of every row selects
#: at least one module, so a mode must neither warn nor fail that one "matches no module".
IGNORE_MODULES_CASES: list[tuple[list[str], set[str]]] = [
    (["blocks.0.attn.q"], {"blocks.0.attn.q"}),  # an exact name
    (["blocks.0.attn"], {"blocks.0.attn.q", "blocks.0.attn.k"}),  # a parent
    (["blocks.*.attn"], {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.1.attn.q"}),  # glob, parent
    (["*.q"], {"blocks.0.attn.q", "blocks.1.attn.q"}),  # a glob over leaves; * crosses dots
    (["blocks.?.attn.[k]"], {"blocks.0.attn.k"}),  # ? and [ make a glob too
    (["lm_head"], {"lm_head"}),  # a name, not a prefix: not lm_head2
    (["blocks.1", "lm_head2"], {"blocks.1.attn.q", "lm_head2"}),
    # names are matched from the end as well, by whole parts (peft's base_model.model.lm_head)
    (["attn.q"], {"blocks.0.attn.q", "blocks.1.attn.q"}),  # a module's trailing parts
    (["0.attn"], {"blocks.0.attn.q", "blocks.0.attn.k"}),  # a parent's trailing parts
    (["mlp.u[p]"], {"blocks.0.mlp.up"}),  # a glob, from the end too
    # the second entry selects only what the first already does: both are used
    (["blocks.0", "blocks.0.attn.q"], {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.mlp.up"}),
]


def ignore_modules_model() -> torch.nn.Module:
    """``blocks.0.attn.{q,k}``, ``blocks.0.mlp.up``, ``blocks.1.attn.q``, ``lm_head``,
    ``lm_head2``: 32x32 ``nn.Linear`` layers (sizes every first-party plugin converts),
    the same weights every call."""
    torch.manual_seed(0)

    def linears(*names: str) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({n: torch.nn.Linear(32, 32) for n in names})

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([
        torch.nn.ModuleDict({"attn": linears("q", "k"), "mlp": linears("up")}),
        torch.nn.ModuleDict({"attn": linears("q")}),
    ])
    model.lm_head = torch.nn.Linear(32, 32)
    model.lm_head2 = torch.nn.Linear(32, 32)
    return model


def assert_ignore_modules_rule(wrapped: torch.nn.Module, patterns: list[str], selected: set[str],
                               converted: Callable[[torch.nn.Module], bool]) -> None:
    """``wrapped`` (:func:`ignore_modules_model` wrapped with ``ignore_modules=patterns``)
    converted exactly the Linear layers ``patterns`` do not select (``converted(module)``
    says whether the mode converted one) and left the ``selected`` ones plain
    ``nn.Linear``; ``selected`` is also what :func:`mixprec.utils.match_module` selects.
    Raises ``AssertionError`` naming the layers otherwise."""
    rule = {n for n in IGNORE_MODULES_LINEARS if match_module(n, patterns)}
    done = {n for n, m in wrapped.named_modules() if converted(m)}
    kept = {n for n, m in wrapped.named_modules() if type(m) is torch.nn.Linear}
    problems = []
    if rule != selected:
        problems.append(f"match_module selects {sorted(rule)}, the table says {sorted(selected)}")
    if done != set(IGNORE_MODULES_LINEARS) - selected:
        problems.append(f"converted {sorted(done)}, expected "
                        f"{sorted(set(IGNORE_MODULES_LINEARS) - selected)}")
    if kept != selected:
        problems.append(f"left plain nn.Linear {sorted(kept)}, expected {sorted(selected)}")
    if problems:
        raise AssertionError(f"ignore_modules={patterns}: " + "; ".join(problems))
