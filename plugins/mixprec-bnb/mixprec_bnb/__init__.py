"""mixprec-bnb: bitsandbytes 4/8-bit weights and 8-bit Adam for mixprec.

Modes (found by mixprec through the ``mixprec`` entry-point group)::

    nf4, nf4-dq, fp4, fp4-dq, int8, int8-training      # precision modes
    adam8bit, adamw8bit, paged-adam8bit, paged-adamw8bit  # optimizer modes

    model, opt = mixprec.wrap(model, opt, mode="nf4-dq+adamw8bit")
    mixprec.wrap(model, opt, mode=[BitsandbytesMode("nf4", ignore_modules={"lm_head"}),
                                   BitsandbytesOptimizer("adamw8bit")])

Importing this package does not import bitsandbytes; the classes load it when
they are first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._layers import QuantLinear4bit, QuantLinear8bit
    from ._optim import BitsandbytesOptimizer
    from ._precision import BitsandbytesMode

__all__ = ["BitsandbytesMode", "BitsandbytesOptimizer", "QuantLinear4bit", "QuantLinear8bit",
           "__version__"]

__version__ = "0.1.0"

_LAZY = {
    "BitsandbytesMode": "._precision",
    "BitsandbytesOptimizer": "._optim",
    "QuantLinear4bit": "._layers",
    "QuantLinear8bit": "._layers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
