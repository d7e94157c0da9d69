"""The contracts every mode keeps: exact resume on CPU, no poisoned weights."""

from __future__ import annotations

import pytest
import torch
from conftest import make_wide, train_wide

from mixprec.testing import checkpoint_roundtrip as roundtrip
from mixprec.testing import wrap_quietly as wrap_quiet

CASES = [
    ("fp8-tensorwise", {}),
    ("fp8-rowwise+ao-adamw8bit", {}),
    ("fp8-rowwise-gw-hp+ao-adamw4bit", {}),
    ("fp8-tensorwise+ao-adamw-fp8", {"param_dtype": "bf16", "master_weights": True}),
]


@pytest.mark.parametrize(("mode", "options"), CASES, ids=[c[0] for c in CASES])
def test_resume_is_bit_identical(mode: str, options: dict) -> None:
    def fresh(seed: int):
        model = make_wide(seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return wrap_quiet(model, opt, mode, **options)

    model, opt = fresh(0)
    train_wide(model, opt, 4)
    checkpoint = roundtrip(model.precision.state_dict())
    expected = train_wide(model, opt, 4, start=4)

    resumed, ropt = fresh(seed=9)  # different initial weights: everything must come from the file
    resumed.precision.load_state_dict(checkpoint)
    assert ropt.precision.steps == 4
    got = train_wide(resumed, ropt, 4, start=4)
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


@pytest.mark.parametrize("mode", ["fp8-tensorwise+ao-adamw8bit", "fp8-rowwise-gw-hp+ao-adamw4bit"])
def test_a_non_finite_step_is_skipped_and_poisons_nothing(mode: str) -> None:
    model = make_wide()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = wrap_quiet(model, opt, mode)
    train_wide(model, opt, 2)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    states = {p: {k: (v.dequantize() if hasattr(v, "dequantize") else v).clone()
                  for k, v in opt.state[p].items()} for p in model.parameters()}
    # FP8's dynamic scale turns an inf input into NaN everywhere downstream
    train_wide(model, opt, 1, poison=True)
    assert opt.precision.skipped_steps == 1
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name
        for key, value in opt.state[p].items():
            now = value.dequantize() if hasattr(value, "dequantize") else value
            assert torch.equal(now, states[p][key]), (name, key)
    losses = train_wide(model, opt, 2, start=2)
    assert all(torch.isfinite(torch.tensor(losses)))
