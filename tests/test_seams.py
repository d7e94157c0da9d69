"""Integrity at the seams: what the user's own torch setup brings into a wrapped
model (its default dtype, threads, sparse and complex parameters, torch.compile,
models that share parameters, optimizer state loaded before wrap)."""

from __future__ import annotations

import pytest
import torch
from conftest import CORE_IDS, CORE_MODES, TinyNet, train

import mixprec


def _tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def restore_default_dtype():
    """Put torch's default dtype back to fp32 after a test that changes it."""
    yield
    torch.set_default_dtype(torch.float32)


# -- a default dtype other than fp32 -------------------------------------------------------


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize(("mode", "options"), CORE_MODES, ids=CORE_IDS)
def test_every_core_mode_trains_under_a_non_fp32_default_dtype(
        restore_default_dtype, mode, options, default):
    def run(model: TinyNet) -> list[float]:
        model, opt = mixprec.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2), mode,
                                  **options)
        return train(model, opt, steps=4)

    ours, reference = _tiny(), _tiny()  # the same fp32 weights
    want = run(reference)
    torch.set_default_dtype(default)
    got = run(ours)
    assert got == want  # nothing mixprec creates follows the user's default dtype
    assert torch.get_default_dtype() is default
