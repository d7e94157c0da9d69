"""A third-party mode: fp32 weights with outputs rounded through bf16 (for tests)."""

import torch

import mixprec


class RoundedOutput(mixprec.PrecisionMode):
    name = "testplugin-rounded"

    def convert_output(self, data):
        return mixprec.apply_to_float_tensors(data, lambda t: t.to(torch.bfloat16).float())


@mixprec.hookimpl
def mixprec_modes():
    return [mixprec.ModeSpec("testplugin-rounded", RoundedOutput,
                             "fp32 model whose outputs are rounded through bf16 (test plugin)")]
