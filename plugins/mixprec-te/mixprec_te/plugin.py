"""The ``mixprec`` entry point of mixprec-te: the modes it provides.

Imports only ``mixprec``; Transformer Engine is imported when a mode is used.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import mixprec
from mixprec.utils import ScalerConfig

__all__ = ["mixprec_modes"]

_REQUIRES = ("NVIDIA GPU with compute capability >= 8.9 (Ada, Hopper, Blackwell), "
             "transformer-engine[pytorch]")


def _bf16(
    *, recipe: Any = None, replace_layers: bool = True, fallback_dtype: Any = None,
    ignore_modules: Any = (), master_weights: bool | None = None,
    keep_output_dtype: bool = False,
) -> mixprec.PrecisionMode:
    from ._mode import TransformerEngineMode

    return TransformerEngineMode(
        "bf16", recipe=recipe, replace_layers=replace_layers, fallback_dtype=fallback_dtype,
        ignore_modules=ignore_modules, master_weights=master_weights,
        keep_output_dtype=keep_output_dtype,
    )


def _fp16(
    *, recipe: Any = None, replace_layers: bool = True, fallback_dtype: Any = None,
    ignore_modules: Any = (), master_weights: bool | None = None,
    keep_output_dtype: bool = False, **scaler: Any,
) -> mixprec.PrecisionMode:
    from ._mode import TransformerEngineMode

    return TransformerEngineMode(
        "fp16", recipe=recipe, replace_layers=replace_layers, fallback_dtype=fallback_dtype,
        ignore_modules=ignore_modules, master_weights=master_weights,
        keep_output_dtype=keep_output_dtype, **scaler,
    )


# The loss-scaler options are ScalerConfig's fields (one definition in the core): spelled
# out in the signature so the registry names a misspelt one and suggests the closest.
_fp16.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    *(p for p in inspect.signature(_fp16).parameters.values()
      if p.kind is inspect.Parameter.KEYWORD_ONLY),
    *(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
      for f in dataclasses.fields(ScalerConfig)),
])


@mixprec.hookimpl
def mixprec_modes() -> list[mixprec.ModeSpec]:
    return [
        mixprec.ModeSpec(
            "transformer-engine", _bf16,
            "Transformer Engine FP8 Linear layers, bf16 weights and fallback compute",
            requires=_REQUIRES, api_version=2, tags={"cuda-only"},
        ),
        mixprec.ModeSpec(
            "transformer-engine-float16", _fp16,
            "Transformer Engine FP8 Linear layers, fp16 weights, fp32 masters, "
            "dynamic loss scaling",
            requires=_REQUIRES, api_version=2, tags={"cuda-only"},
        ),
    ]
