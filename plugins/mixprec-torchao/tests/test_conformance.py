"""The mixprec conformance kit (mixprec.testing) against every mode of this plugin."""

from __future__ import annotations

import mixprec_torchao.plugin

from mixprec.testing import ModeConformance


class _Ao(ModeConformance):
    plugin = mixprec_torchao.plugin
    heavy_imports = ("torchao",)


class TestFp8Tensorwise(_Ao):
    mode = "fp8-tensorwise"


class TestFp8Rowwise(_Ao):
    mode = "fp8-rowwise"


class TestFp8RowwiseGwHp(_Ao):
    mode = "fp8-rowwise-gw-hp"


class TestAoAdamW8bit(_Ao):
    mode = "ao-adamw8bit"


class TestAoAdamW4bit(_Ao):
    mode = "ao-adamw4bit"


class TestAoAdamWFp8(_Ao):
    mode = "ao-adamw-fp8"


class TestBf16TrueAoAdamW8bit(_Ao):
    mode = "bf16-true+ao-adamw8bit"
