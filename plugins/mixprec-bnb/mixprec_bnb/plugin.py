"""Entry point of ``mixprec-bnb``: the modes it provides.

Imports only ``mixprec`` and the standard library: bitsandbytes loads when a
mode object is built (the registry calls a factory only when a mode is used).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import mixprec

if TYPE_CHECKING:
    from ._optim import BitsandbytesOptimizer
    from ._precision import BitsandbytesMode

__all__ = ["mixprec_modes"]

#: precision modes and their one-line summaries
PRECISION_MODES = {
    "nf4": "4-bit NormalFloat weights (bitsandbytes Linear4bit), frozen; compute in bf16",
    "nf4-dq": "nf4 with double-quantized constants (~0.516 B/weight), frozen; the QLoRA base",
    "fp4": "4-bit float weights (bitsandbytes Linear4bit), frozen; compute in bf16",
    "fp4-dq": "fp4 with double-quantized constants, frozen",
    "int8": "int8 weights, per-row scales (bitsandbytes Linear8bitLt), frozen",
    "int8-training": "trainable 16-bit Linear weights, int8 matmul (bitsandbytes Linear8bitLt)",
}
#: optimizer modes, their summaries and what they need
OPTIMIZER_MODES = {
    "adam8bit": ("torch Adam -> bitsandbytes Adam8bit (8-bit state, 32-bit for embeddings)", ""),
    "adamw8bit": ("torch AdamW -> bitsandbytes AdamW8bit (8-bit state, 32-bit for embeddings)", ""),
    "paged-adam8bit": ("adam8bit with state in CUDA unified (paged) memory", "CUDA"),
    "paged-adamw8bit": ("adamw8bit with state in CUDA unified (paged) memory", "CUDA"),
}


def _precision_factory(name: str) -> Callable[..., BitsandbytesMode]:
    def factory(
        *, dtype: Any = None, ignore_modules: str | Iterable[str] = (),
        blocksize: int | None = None, quant_storage: Any = None, master_weights: bool | None = None,
        quantize_lm_head: bool = False, keep_output_dtype: bool = False,
    ) -> BitsandbytesMode:
        from ._precision import BitsandbytesMode

        return BitsandbytesMode(name, dtype=dtype, ignore_modules=ignore_modules,
                                blocksize=blocksize, quant_storage=quant_storage,
                                master_weights=master_weights, quantize_lm_head=quantize_lm_head,
                                keep_output_dtype=keep_output_dtype)

    factory.__name__ = f"{name.replace('-', '_')}_factory"
    return factory


def _optimizer_factory(name: str) -> Callable[..., BitsandbytesOptimizer]:
    def factory() -> BitsandbytesOptimizer:
        from ._optim import BitsandbytesOptimizer

        return BitsandbytesOptimizer(name)

    factory.__name__ = f"{name.replace('-', '_')}_factory"
    return factory


@mixprec.hookimpl
def mixprec_modes() -> list[mixprec.ModeSpec]:
    """The bitsandbytes precision and optimizer modes."""
    specs = [mixprec.ModeSpec(name, _precision_factory(name), summary, api_version=2,
                              tags=set() if name == "int8-training" else {"frozen-weights"})
             for name, summary in PRECISION_MODES.items()]
    specs += [mixprec.ModeSpec(name, _optimizer_factory(name), summary, kind="optimizer",
                               requires=requires, api_version=2,
                               tags={"cuda-only"} if requires == "CUDA" else set())
              for name, (summary, requires) in OPTIMIZER_MODES.items()]
    return specs
