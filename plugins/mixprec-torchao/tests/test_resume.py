"""Exact resume: save, load into a fresh wrap, train on == never stopping (CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_mlp, roundtrip, train, wrap_quiet

CASES = [
    ("fp8-tensorwise", {}),
    ("fp8-rowwise+ao-adamw8bit", {}),
    ("fp8-rowwise-gw-hp+ao-adamw4bit", {}),
    ("fp8-tensorwise+ao-adamw-fp8", {"param_dtype": "bf16", "master_weights": True}),
]


@pytest.mark.parametrize(("mode", "options"), CASES, ids=[c[0] for c in CASES])
def test_resume_is_bit_identical(mode: str, options: dict) -> None:
    def fresh(seed: int):
        model = make_mlp(seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return wrap_quiet(model, opt, mode, **options)

    model, opt = fresh(0)
    train(model, opt, 4)
    checkpoint = roundtrip(model.precision.state_dict())
    expected = train(model, opt, 4, start=4)

    resumed, ropt = fresh(seed=9)  # different initial weights: everything must come from the file
    resumed.precision.load_state_dict(checkpoint)
    assert ropt.precision.steps == 4
    got = train(resumed, ropt, 4, start=4)
    assert got == expected
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for group, rgroup in zip(opt.param_groups, ropt.param_groups):
        for p, q in zip(group["params"], rgroup["params"]):
            for key, value in opt.state[p].items():
                other = ropt.state[q][key]
                if hasattr(value, "codes"):
                    assert torch.equal(value.codes, other.codes) and torch.equal(value.scale,
                                                                                 other.scale)
                else:
                    assert torch.equal(value, other), key
