"""Integrity at the seams between the user's objects and torchao's optimizers: LR
schedulers built before or after wrap, complex parameters."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_wide, train_wide

import mixprec
from mixprec.exceptions import WrapError
from mixprec.testing import seeded

OPTIM_MODES = ["ao-adamw8bit", "ao-adamw4bit", "ao-adamw-fp8"]
EARLY = "lr_scheduler.step()` before `optimizer.step()`"


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("mode", OPTIM_MODES)
def test_an_lr_scheduler_built_before_or_after_wrap_steers_the_learning_rate(mode, when):
    model = make_wide()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    groups = list(opt.param_groups)
    # lr 3e-3 for the first step, then 0: a step at lr 0 leaves AdamW's weights as they are
    schedule = lambda step: 1.0 if step == 0 else 0.0  # noqa: E731
    if when == "before":
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model, opt = mixprec.wrap(model, opt, f"32-true+{mode}")
    if when == "after":
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = [p.detach().clone() for p in model.parameters()]
        train_wide(model, opt, 1)
        scheduler.step()
        moved = [p.detach().clone() for p in model.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(first, moved))
        assert float(opt.param_groups[0]["lr"]) == 0.0 == float(scheduler.get_last_lr()[0])
        train_wide(model, opt, 1, start=1)
        scheduler.step()
    for a, b in zip(moved, model.parameters()):
        assert torch.equal(a, b), "the step ran with a learning rate other than the scheduler's"
    assert not [w for w in caught if EARLY in str(w.message)]
    assert all(a is b for a, b in zip(opt.param_groups, groups))  # the user's dicts


class _WithComplex(torch.nn.Module):
    """A complex parameter next to a real layer (spectral filters hold such weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)
        self.filter = torch.nn.Parameter(torch.randn(64, 64, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + (x.to(torch.complex64) @ self.filter).real


@pytest.mark.parametrize("mode", [f"32-true+{m}" for m in OPTIM_MODES])
def test_complex_parameters_are_refused_before_anything_changes(mode):
    model = seeded(_WithComplex)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(WrapError, match=r"Parameter 'filter' is torch.complex64, which .* would "
                                        r"update as if it were real numbers"):
        mixprec.wrap(model, opt, mode)
    assert not mixprec.is_wrapped(model)
    assert [dict(g) for g in opt.param_groups] == groups and not opt.state
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
