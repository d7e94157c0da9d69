"""The mixprec conformance kit (mixprec.testing) against the TE mode, on the CPU stand-in."""

from __future__ import annotations

import pytest
from _te_testing import CpuTestMode

from mixprec.testing import ModeConformance


@pytest.fixture
def unsafe_pickle_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    # The stand-in stores delayed-scaling extra state as TE does; loading it back in a
    # resume needs TE's opt-in (see the README's checkpoint section).
    monkeypatch.setenv("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE", "1")


@pytest.mark.usefixtures("te", "unsafe_pickle_ok")
class TestTransformerEngineStandIn(ModeConformance):
    mode = CpuTestMode
    meta_init = "to_empty"
    # TE's FP8 extra state is a pickled blob whose bytes differ run to run; the weights
    # and optimizer state it guards are compared bit for bit.
    resume_ignore_keys = ("._extra_state",)

    @pytest.mark.skip(reason="the stand-in's layer classes are defined inside a fixture and "
                             "cannot be pickled (real TE layers: not checked here)")
    def test_deepcopy_pickle_and_torch_save(self) -> None:
        pass
