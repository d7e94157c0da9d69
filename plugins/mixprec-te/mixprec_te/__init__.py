"""mixprec-te: FP8 training through NVIDIA Transformer Engine, as mixprec modes.

    import mixprec
    model, opt = mixprec.wrap(model.cuda(), opt, mode="transformer-engine")

Modes ``transformer-engine`` (bf16 weights) and ``transformer-engine-float16``
(fp16 weights, fp32 masters, dynamic loss scaling). Options through a mode
object: ``TransformerEngineMode("bf16", recipe={...}, ignore_modules={"lm_head"})``.
"""

from ._mode import TransformerEngineMode
from ._policy import FP8_DIM_MULTIPLE, LayerDecision, LayerPlan, linear_fits, plan_layers
from ._recipe import build_recipe, describe_recipe, normalize_recipe
from ._te import INSTALL_HINT, PIP_PACKAGE

__version__ = "0.1.0"

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
