"""bf16-sr keeps every contract of mixprec's design (the conformance kit)."""

from __future__ import annotations

from typing import Any, ClassVar

import mixprec_example.plugin
import pytest
import torch

from mixprec.exceptions import ModeOptionError
from mixprec.testing import ModeConformance


class TestBf16Sr(ModeConformance):
    """Found through the installed entry point, as users get it."""

    mode = "bf16-sr"
    # the entry point must not import the mode's module (it loads when the mode is used)
    heavy_imports = ("mixprec_example._mode", "mixprec_example._rounding")
    bad_options: ClassVar[list[Any]] = [
        ({"seed": -1}, ModeOptionError),
        ({"seed": "zero"}, ModeOptionError),
        ({"keep_output_dtype": "yes"}, ModeOptionError),
    ]


class TestBf16SrKeepingBf16Outputs(ModeConformance):
    """Registered by hand into a fresh registry, with options."""

    mode = "bf16-sr"
    plugin = mixprec_example.plugin
    options: ClassVar[dict[str, Any]] = {"seed": 7, "keep_output_dtype": True}
    output_dtype = torch.bfloat16
    heavy_imports = ("mixprec_example._mode",)


@pytest.mark.gpu
class TestBf16SrOnCuda(ModeConformance):
    """One generator per device: the CUDA one is seeded, saved and restored too
    (skips itself without CUDA)."""

    mode = "bf16-sr"
    device = "cuda"
