"""The entry point: tells mixprec which modes this distribution provides.

Registered in ``pyproject.toml`` as ``[project.entry-points.mixprec]
mixprec-example = "mixprec_example.plugin"``. mixprec imports this module when
its registry is first used, so it imports only ``mixprec``: the mode's module
(and any heavy library it needed) is imported by the factory, when the mode is
actually used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mixprec

if TYPE_CHECKING:
    from ._mode import Bf16StochasticRounding


def _bf16_sr(*, seed: int = 0, keep_output_dtype: bool = False) -> Bf16StochasticRounding:
    # Explicit keyword-only options: the registry then refuses unknown ones by name
    # ("Mode 'bf16-sr' does not take option 'sed'. Did you mean 'seed'?").
    from ._mode import Bf16StochasticRounding

    return Bf16StochasticRounding(seed=seed, keep_output_dtype=keep_output_dtype)


@mixprec.hookimpl
def mixprec_modes() -> list[mixprec.ModeSpec]:
    return [
        mixprec.ModeSpec(
            "bf16-sr",
            _bf16_sr,
            "bf16 weights without fp32 masters; fp32 optimizer math, updates stochastically "
            "rounded to bf16",
            api_version=1,
        ),
    ]
