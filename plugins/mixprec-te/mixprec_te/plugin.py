"""The ``mixprec`` entry point of mixprec-te: the modes it provides.

Imports only ``mixprec``; Transformer Engine is imported when a mode is used.
"""

from __future__ import annotations

from typing import Any

import mixprec

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
    keep_output_dtype: bool = False, init_scale: float = 2.0**16, growth_factor: float = 2.0,
    backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0 / 2**24,
    max_scale: float = 2.0**24, hysteresis: int = 1,
) -> mixprec.PrecisionMode:
    from ._mode import TransformerEngineMode

    scaler = {"init_scale": init_scale, "growth_factor": growth_factor,
              "backoff_factor": backoff_factor, "growth_interval": growth_interval,
              "min_scale": min_scale, "max_scale": max_scale, "hysteresis": hysteresis}
    defaults = mixprec.LossScaler().config() | {"init_scale": 2.0**16}
    return TransformerEngineMode(
        "fp16", recipe=recipe, replace_layers=replace_layers, fallback_dtype=fallback_dtype,
        ignore_modules=ignore_modules, master_weights=master_weights,
        keep_output_dtype=keep_output_dtype,
        **{k: v for k, v in scaler.items() if v != defaults[k]},
    )


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
