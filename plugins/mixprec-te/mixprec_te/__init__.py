"""mixprec-te: FP8 training through NVIDIA Transformer Engine, as mixprec modes.

    import mixprec
    model, opt = mixprec.wrap(model.cuda(), opt, mode="transformer-engine")

Modes ``transformer-engine`` (bf16 weights) and ``transformer-engine-float16``
(fp16 weights, fp32 masters, dynamic loss scaling). Options through a mode
object: ``TransformerEngineMode("bf16", recipe={...}, ignore_modules={"lm_head"})``.

The public names load on first access, so that the entry point
(``mixprec_te.plugin``) imports nothing but ``mixprec``; Transformer Engine
itself is imported only when a mode is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._mode import TransformerEngineMode
    from ._policy import FP8_DIM_MULTIPLE, LayerDecision, LayerPlan, linear_fits, plan_layers
    from ._recipe import build_recipe, describe_recipe, normalize_recipe
    from ._te import INSTALL_HINT, PIP_PACKAGE

__version__ = "0.1.0"

_EXPORTS = {
    "FP8_DIM_MULTIPLE": "._policy",
    "INSTALL_HINT": "._te",
    "LayerDecision": "._policy",
    "LayerPlan": "._policy",
    "PIP_PACKAGE": "._te",
    "TransformerEngineMode": "._mode",
    "build_recipe": "._recipe",
    "describe_recipe": "._recipe",
    "linear_fits": "._policy",
    "normalize_recipe": "._recipe",
    "plan_layers": "._policy",
}

__all__ = [
    "FP8_DIM_MULTIPLE",
    "INSTALL_HINT",
    "PIP_PACKAGE",
    "LayerDecision",
    "LayerPlan",
    "TransformerEngineMode",
    "__version__",
    "build_recipe",
    "describe_recipe",
    "linear_fits",
    "normalize_recipe",
    "plan_layers",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
