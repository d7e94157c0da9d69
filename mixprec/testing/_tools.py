"""Small helpers for a plugin's own tests, next to the conformance checks
(see :mod:`mixprec.testing`): what every plugin's test suite otherwise writes
again — a seeded model, a training loop, a checkpoint round trip, a quiet
``wrap``, a bit-for-bit comparison of state dicts.
(PYTEST_DONT_REWRITE: the kit raises its own messages.)
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

import mixprec

from ._helpers import nested_differences

__all__ = ["assert_state_equal", "checkpoint_roundtrip", "first_party_modes", "seeded",
           "train_steps", "wrap_quietly"]

_T = TypeVar("_T")


def first_party_modes(distribution: str) -> frozenset[str]:
    """The mode names the core's install hints attribute to ``distribution`` (an unknown
    mode of that name says ``pip install <distribution>``). A first-party plugin's tests
    check that it provides exactly these; for any other distribution the set is empty,
    and its modes must not take these names."""
    from .._registry import FIRST_PARTY_MODES

    return frozenset(n for n, d in FIRST_PARTY_MODES.items() if d == distribution)


def seeded(factory: Callable[..., _T], *args: Any, seed: int = 0, **kwargs: Any) -> _T:
    """``factory(*args, **kwargs)`` right after ``torch.manual_seed(seed)``: a model
    with the same initial weights on every call (two calls, two equal models)."""
    torch.manual_seed(seed)
    return factory(*args, **kwargs)


def train_steps(
    optimizer: Any, loss_at: Callable[[int], torch.Tensor], steps: int, *, start: int = 0,
    accumulate: int = 1,
) -> list[float]:
    """Run ``steps`` optimizer steps, numbered from ``start``, of ``accumulate``
    micro-batches each; return each step's loss (of its last micro-batch).

    ``loss_at(i)`` computes the loss of micro-batch ``i = step * accumulate + micro``
    (deterministic per ``i``, so a run resumed at ``start`` sees the same data).
    Backward goes through ``optimizer.backward`` when the optimizer is wrapped
    (loss scaling, skipped steps) and ``loss.backward()`` otherwise; a loss that
    needs no gradient (a mode froze every parameter) is not backpropagated, but
    the step still runs.
    """
    backward = getattr(optimizer, "backward", None)
    losses = []
    for step in range(start, start + steps):
        for micro in range(accumulate):
            loss = loss_at(step * accumulate + micro)
            part = loss if accumulate == 1 else loss / accumulate
            if part.requires_grad:
                if backward is not None:
                    backward(part)
                else:
                    part.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def checkpoint_roundtrip(obj: Any) -> Any:
    """``obj`` after ``torch.save`` and ``torch.load(weights_only=True)``, as a
    checkpoint written to disk and read back would be (plain values and tensors
    only, or the load fails)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def wrap_quietly(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, mode: Any, *,
    silence: str = "", **options: Any,
) -> Any:
    """``mixprec.wrap(model, optimizer, mode, **options)`` without the
    :class:`mixprec.MixprecWarning` s whose message matches ``silence`` (a regular
    expression matched at the start, as in warning filters; ``""``: all of them).

    For tests whose subject is not the warning (frozen weights, layers kept in
    high precision); the tests of the warning itself call ``mixprec.wrap``.
    Other warnings pass through.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=silence, category=mixprec.MixprecWarning)
        return mixprec.wrap(model, optimizer, mode, **options)


def _order_differences(expected: Any, got: Any, path: str = "") -> list[str]:
    if not (isinstance(expected, Mapping) and isinstance(got, Mapping)):
        return []
    where = path or "<root>"
    out = []
    if set(expected) == set(got) and list(expected) != list(got):
        out.append(f"{where}: the same keys in another order")
    for key in expected:
        if key in got:
            out += _order_differences(expected[key], got[key], f"{path}.{key}" if path else str(key))
    return out


def assert_state_equal(expected: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    """Two state dicts (or checkpoints) are the same: the same keys in the same
    order, every tensor equal in dtype, shape and value (bit for bit), nested
    dicts and lists compared alike, other values equal.

    :raises AssertionError: listing where they differ.
    """
    diffs = _order_differences(expected, got) + nested_differences(expected, got)
    if diffs:
        raise AssertionError("the states differ: " + "; ".join(diffs))
