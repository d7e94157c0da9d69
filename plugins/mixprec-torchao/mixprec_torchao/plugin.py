"""The entry point mixprec loads: the modes this distribution provides.

Imports only mixprec, torch and this package's light modules; torchao is
imported when a mode object is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

import mixprec

from ._fp8 import Float8Training
from ._optim import LowBitAdamW
from ._select import ModuleFilter

__all__ = ["mixprec_modes"]

_FP8_NEEDS = "torchao; a CUDA GPU with FP8 (sm89+: Ada, Hopper) for speed, or the CPU (slow)"


def _fp8(recipe: str) -> Callable[..., Float8Training]:
    def factory(
        *, ignore_modules: str | Iterable[str] = (), module_filter: ModuleFilter | None = None,
        autocast: str | torch.dtype | None = "bf16", param_dtype: str | torch.dtype = "32",
        master_weights: bool = False, emulate: bool = False, pad_inner_dim: bool = False,
        keep_output_dtype: bool = False,
    ) -> Float8Training:
        return Float8Training(
            recipe, ignore_modules=ignore_modules, module_filter=module_filter,
            autocast=autocast, param_dtype=param_dtype, master_weights=master_weights,
            emulate=emulate, pad_inner_dim=pad_inner_dim, keep_output_dtype=keep_output_dtype,
        )
    return factory


def _adamw(bits: str) -> Callable[..., LowBitAdamW]:
    def factory(*, block_size: int | None = None, bf16_stochastic_round: bool = False) -> Any:
        return LowBitAdamW(bits, block_size=block_size,
                           bf16_stochastic_round=bf16_stochastic_round)
    return factory


@mixprec.hookimpl
def mixprec_modes() -> list[mixprec.ModeSpec]:
    """The FP8 precision modes and the low-bit AdamW optimizer modes."""
    spec = mixprec.ModeSpec
    return [
        spec("fp8-tensorwise", _fp8("tensorwise"),
             "torchao FP8 nn.Linear (per-tensor scales), bf16 autocast elsewhere, fp32 weights",
             requires=_FP8_NEEDS, api_version=2, tags={"slow-on-cpu"}),
        spec("fp8-rowwise", _fp8("rowwise"),
             "torchao FP8 nn.Linear (per-row scales), bf16 autocast elsewhere, fp32 weights",
             requires=_FP8_NEEDS, api_version=2, tags={"slow-on-cpu"}),
        spec("fp8-rowwise-gw-hp", _fp8("rowwise_with_gw_hp"),
             "torchao FP8 nn.Linear (per-row scales, grad-weight in high precision), bf16 "
             "autocast elsewhere", requires=_FP8_NEEDS, api_version=2, tags={"slow-on-cpu"}),
        spec("ao-adamw8bit", _adamw("8bit"), "torchao AdamW with 8-bit block-quantized state",
             kind="optimizer", requires="torchao", api_version=2),
        spec("ao-adamw4bit", _adamw("4bit"), "torchao AdamW with 4-bit block-quantized state",
             kind="optimizer", requires="torchao", api_version=2),
        spec("ao-adamw-fp8", _adamw("fp8"), "torchao AdamW with FP8 (e4m3) block-scaled state",
             kind="optimizer", requires="torchao", api_version=2),
    ]
