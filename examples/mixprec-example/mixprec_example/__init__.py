"""mixprec-example: true bf16 training with stochastic rounding (``"bf16-sr"``).

    model, opt = mixprec.wrap(model, opt, "bf16-sr", seed=0)

Also a worked example of a third-party mixprec plugin: ``plugin.py`` is the
entry point, ``_mode.py`` the mode, ``tests/`` run mixprec's conformance kit.

The public names load lazily (PEP 562): mixprec imports ``mixprec_example.plugin``,
and so this package, whenever its registry is first used, which must stay cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._mode import Bf16StochasticRounding
    from ._rounding import stochastic_round_to_bf16

__all__ = ["Bf16StochasticRounding", "stochastic_round_to_bf16"]
__version__ = "0.1.0"

_LAZY = {"Bf16StochasticRounding": "._mode", "stochastic_round_to_bf16": "._rounding"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
