from __future__ import annotations

import pytest
import torch

from mixprec import LossScaler
from mixprec.exceptions import ModeOptionError


def _torch_trajectory(flags, **kw):
    """Scale after each step, computed by torch's own GradScaler update kernel."""
    scale = torch.full((1,), kw.get("init_scale", 2.0**16))
    tracker = torch.zeros(1, dtype=torch.int32)
    out = []
    for flag in flags:
        torch._amp_update_scale_(scale, tracker, torch.full((1,), float(flag)),
                                 kw.get("growth_factor", 2.0), kw.get("backoff_factor", 0.5),
                                 kw.get("growth_interval", 2000))
        out.append(float(scale))
    return out


@pytest.mark.parametrize("flags", [[0] * 7, [1, 0, 0, 1, 1, 0, 0, 0, 0, 0], [1] * 5])
def test_default_semantics_match_torch_gradscaler(flags):
    scaler = LossScaler(growth_interval=3)
    got = []
    for flag in flags:
        scaler.update(bool(flag))
        got.append(scaler.scale)
    assert got == _torch_trajectory(flags, growth_interval=3)


def test_hysteresis_tolerates_overflows_in_a_row():
    scaler = LossScaler(init_scale=1024, hysteresis=3)
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 1024
    scaler.update(True)
    assert scaler.scale == 512
    scaler.update(True)
    scaler.update(False)  # a clean step resets the count
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 512


def test_min_and_max_scale_bound_the_scale():
    scaler = LossScaler(init_scale=4, min_scale=1, max_scale=8, growth_interval=1)
    for _ in range(5):
        scaler.update(True)
    assert scaler.scale == 1
    for _ in range(10):
        scaler.update(False)
    assert scaler.scale == 8


def test_state_dict_round_trips_exactly():
    a = LossScaler(init_scale=256, growth_interval=4, hysteresis=2)
    for flag in [False, True, False, False]:
        a.update(flag)
    b = LossScaler()
    b.load_state_dict(a.state_dict())
    for flag in [False, False, True, True, False]:
        a.update(flag)
        b.update(flag)
        assert a.state_dict() == b.state_dict()


@pytest.mark.parametrize(
    "kwargs",
    [{"init_scale": 0}, {"growth_factor": 0.5}, {"backoff_factor": 1.0}, {"growth_interval": 0},
     {"min_scale": 4, "max_scale": 2}, {"hysteresis": 0}, {"init_scale": float("inf")}],
)
def test_bad_options_are_clear_errors(kwargs):
    with pytest.raises(ModeOptionError, match="Invalid loss-scaler option"):
        LossScaler(**kwargs)
