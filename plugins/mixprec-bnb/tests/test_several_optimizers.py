"""8-bit Adam with several optimizers for one model (``wrap(model, [opt_a, opt_b])``):
each optimizer becomes its own bitsandbytes optimizer, and two of them train exactly
as one optimizer holding the same parameters in two groups."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from conftest import lm_loss, make_lm

import mixprec
from mixprec.testing import checkpoint_roundtrip, train_steps


class Both:
    """The optimizers as one, for ``train_steps``: backward through the first, step each."""

    def __init__(self, opts: tuple) -> None:
        self.opts = opts

    def backward(self, loss: torch.Tensor) -> None:
        self.opts[0].backward(loss)

    def step(self) -> None:
        for opt in self.opts:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.opts:
            opt.zero_grad()


def _parts(model: torch.nn.Module) -> tuple[list, list]:
    body = [p for n, p in model.named_parameters() if not n.startswith("lm_head.")]
    return body, list(model.lm_head.parameters())


def _two(seed: int, mode: str, **options):
    model = make_lm(seed)
    body, head = _parts(model)
    model, opts = mixprec.wrap(model, [torch.optim.AdamW(body, lr=1e-3),
                                       torch.optim.AdamW(head, lr=2e-3)], mode, **options)
    return model, Both(opts)


@pytest.mark.parametrize(("mode", "options"), [("adamw8bit", {}),
                                               ("bf16-true+adamw8bit", {"master_weights": True})])
def test_two_8bit_optimizers_train_as_one_with_two_groups(mode, options) -> None:
    model = make_lm(0)
    body, head = _parts(model)
    one_model, one = mixprec.wrap(
        model, torch.optim.AdamW([{"params": body, "lr": 1e-3}, {"params": head, "lr": 2e-3}]),
        mode, **options)
    two_model, two = _two(0, mode, **options)
    assert [type(o.optimizer) for o in two.opts] == [bnb.optim.AdamW8bit] * 2
    train_steps(one, lambda i: lm_loss(one_model, i), 4)
    train_steps(two, lambda i: lm_loss(two_model, i), 4)
    for (name, a), b in zip(one_model.state_dict().items(), two_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_two_8bit_optimizers_resume_exactly() -> None:
    model, both = _two(0, "adamw8bit")
    train_steps(both, lambda i: lm_loss(model, i), 4)
    expected = model.state_dict()

    model, both = _two(0, "adamw8bit")
    train_steps(both, lambda i: lm_loss(model, i), 2)
    saved = checkpoint_roundtrip(model.precision.state_dict())
    model, both = _two(1, "adamw8bit")
    model.precision.load_state_dict(saved)
    train_steps(both, lambda i: lm_loss(model, i), 2, start=2)
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
