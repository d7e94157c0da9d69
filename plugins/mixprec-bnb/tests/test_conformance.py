"""The mixprec conformance kit (mixprec.testing) against every mode of this plugin."""

from __future__ import annotations

from typing import Any, ClassVar

import mixprec_bnb.plugin
import pytest
import torch

from mixprec.testing import ModeConformance

pytestmark = pytest.mark.filterwarnings("ignore:Mode '.*' froze:mixprec.MixprecWarning")


class _Bnb(ModeConformance):
    plugin = mixprec_bnb.plugin
    heavy_imports = ("bitsandbytes",)


class TestNf4(_Bnb):
    mode = "nf4"
    max_output_error = 0.25  # measured 0.132: the 4-bit quantization error itself


class TestNf4Dq(_Bnb):
    mode = "nf4-dq"
    max_output_error = 0.25


class TestFp4(_Bnb):
    mode = "fp4"
    max_output_error = 0.25  # measured 0.157


class TestFp4Dq(_Bnb):
    mode = "fp4-dq"
    max_output_error = 0.25


class TestInt8(_Bnb):
    mode = "int8"


class TestInt8Training(_Bnb):
    mode = "int8-training"
    init_dtype: ClassVar[dict[str, Any]] = {"fc1.weight": torch.bfloat16,
                                            "fc2.weight": torch.bfloat16}


class TestAdamW8bit(_Bnb):
    mode = "adamw8bit"
    wraps_stepped_optimizer = False  # an optimizer with state is refused, by design


class TestAdam8bitBf16True(_Bnb):
    mode = "bf16-true+adam8bit"
    wraps_stepped_optimizer = False
