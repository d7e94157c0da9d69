"""Stochastic rounding from fp32 to bf16."""

from __future__ import annotations

import torch

__all__ = ["stochastic_round_to_bf16"]

_LOW_BITS = 1 << 16  # bf16 is fp32 with the low 16 mantissa bits dropped


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 ``x`` to bf16, up or down at random with probabilities that make
    the result unbiased: ``E[round(x)] == x``.

    Adds uniform random integers in ``[0, 2**16)`` to the fp32 bit pattern and
    truncates the low 16 bits. Because IEEE floats are sign-magnitude, this rounds
    the magnitude up with probability (distance to the lower neighbour) / (spacing)
    for negative numbers too. Values that bf16 represents exactly come back
    unchanged; inf and NaN stay inf and NaN.

    :param x: a float32 tensor.
    :param generator: the random source (on ``x``'s device); the default one if None.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 takes float32 tensors, got {x.dtype}.")
    bits = x.view(torch.int32)
    noise = torch.randint(0, _LOW_BITS, x.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    rounded = (bits + noise).bitwise_and_(-_LOW_BITS)  # -2**16 == 0xFFFF0000 as int32
    # inf/NaN: the addition could carry into the exponent or sign; keep them as they are.
    rounded = torch.where(torch.isfinite(x), rounded, bits)
    return rounded.view(torch.float32).to(torch.bfloat16)
