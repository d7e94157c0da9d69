"""What a wrapper knows about the engine running it: DDP or FSDP2.

DDP: the wrapper notices the DDP forward it runs in; where a step's gradients
were not all-reduced (the step is taken inside ``no_sync()``) it all-reduces the
inf/NaN flag, so every rank skips the same steps and holds the same loss scale.
With fp32 master weights, micro-batches under ``no_sync()`` keep their gradients
on the model for DDP to reduce instead of moving them into the (unreduced) masters.

FSDP2: a model sharded by :func:`mixprec.distributed.fully_shard` is recorded here
(:func:`record_sharded`) with the mode object that converted it and its
:class:`~mixprec.FSDPPlan`; ``wrap`` follows that record. Gradients are sharded
DTensors: inf/NaN checks read the local shards and the flag is all-reduced over
the mesh.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._interface import FSDPPlan, OptimizerMode, PrecisionMode
from ._tensors import ddp_class, is_fully_sharded
from .exceptions import WrapError

__all__ = ["DistributedSync", "ShardRecord", "check_fsdp_optimizer_modes", "record_sharded"]


@dataclass(frozen=True)
class ShardRecord:
    """A model :func:`mixprec.distributed.fully_shard` converted and sharded: the mode
    object that converted it, its plan and the summary lines of the conversion."""

    mode: PrecisionMode
    plan: FSDPPlan
    lines: tuple[str, ...]


_SHARDED: weakref.WeakKeyDictionary[torch.nn.Module, ShardRecord] = weakref.WeakKeyDictionary()


def record_sharded(model: torch.nn.Module, record: ShardRecord) -> None:
    """Remember that ``model`` was converted and sharded for ``record.mode``."""
    _SHARDED[model] = record


def check_fsdp_optimizer_modes(optimizer_modes: Sequence[OptimizerMode]) -> None:
    """Refuse optimizer modes that cannot step DTensor shards."""
    for om in optimizer_modes:
        if not om.fsdp_compatible:
            provider = type(om).__module__.split(".")[0].replace("_", "-")
            raise WrapError(
                f"Optimizer mode {om.name!r} (from {provider}) cannot step the sharded "
                "(DTensor) parameters of a fully_shard-ed (FSDP2) model; use a plain torch "
                "optimizer with FSDP2, or train with DistributedDataParallel."
            )


class DistributedSync:
    """The engine one :class:`~mixprec.PrecisionWrapper` runs in.

    ``engine`` is ``"ddp"`` once a forward ran inside a ``DistributedDataParallel``
    forward, ``"fsdp"`` for a model sharded by ``fully_shard``, else None.
    """

    def __init__(self) -> None:
        self.engine: str | None = None
        self._ddp_group: Any = None
        self._ddp_synced = True  # will the last DDP forward's backward all-reduce?
        self._mesh: Any = None

    # -- wrap ------------------------------------------------------------------------

    def attach(
        self, model: torch.nn.Module, mode: PrecisionMode, optimizer_modes: Sequence[OptimizerMode],
    ) -> ShardRecord | None:
        """Check ``model`` can be wrapped as it is; for a model ``fully_shard`` converted,
        return its record (the wrapper then runs that mode object by its plan).

        Raises before anything is changed: ``wrap(DDP(model))``, a model sharded by
        torch's own ``fully_shard``, or a mode other than the one it was sharded for.
        """
        ddp = ddp_class()
        if ddp is not None and isinstance(model, ddp):
            raise WrapError(
                "wrap() got a DistributedDataParallel model; wrap the plain model first and "
                "give the result to DDP: model, opt = mixprec.wrap(model, opt, mode); "
                "model = DistributedDataParallel(model)."
            )
        if not is_fully_sharded(model):
            return None
        record = _SHARDED.get(model)
        if record is None:
            raise WrapError(
                "This model was sharded with torch's fully_shard, so mixprec cannot convert "
                "it any more; shard the plain model with mixprec.distributed.fully_shard(model, "
                "mode, modules=...) instead, which converts it first and picks the matching "
                "MixedPrecisionPolicy."
            )
        sharded = record.mode
        if sharded is not mode and (sharded.name != mode.name
                                    or sharded.options() != mode.options()):
            raise WrapError(
                f"The model was sharded for mode {sharded.describe()!r} but wrap() asks "
                f"for {mode.describe()!r}; pass the same mode and options to wrap() as to "
                "mixprec.distributed.fully_shard()."
            )
        check_fsdp_optimizer_modes(optimizer_modes)
        self.engine = "fsdp"
        self._mesh = next((p.device_mesh for p in model.parameters()
                           if hasattr(p, "device_mesh")), None)
        return record

    # -- training ----------------------------------------------------------------------

    def note_forward(self) -> None:
        """Called at each forward of the wrapped module: is it inside a DDP forward?"""
        ddp = ddp_class()
        active = None if ddp is None else ddp._get_active_ddp_module()
        if active is None:
            return
        self.engine = "ddp"
        self._ddp_group = active.process_group
        # DDP prepares the gradient all-reduce only for these forwards (DDP._pre_forward).
        self._ddp_synced = bool(torch.is_grad_enabled() and active.require_backward_grad_sync)

    def holds_grads_on_model(self) -> bool:
        """True while DDP's ``no_sync()`` accumulates: gradients must stay on the model's
        parameters for DDP to reduce them at the synchronising backward."""
        return self.engine == "ddp" and not self._ddp_synced

    def agree(self, found_inf: bool, device: torch.device | None) -> bool:
        """All-reduce the inf/NaN flag where gradients differ between ranks.

        Under DDP with synchronised gradients every rank reads the same numbers
        and nothing is sent. Under FSDP2 each rank checked only its shards.
        """
        if self.engine == "fsdp" and self._mesh is not None:
            groups = list(self._mesh.get_all_groups())
            device = torch.device(self._mesh.device_type) if device is None else device
        elif self.engine == "ddp" and not self._ddp_synced:
            groups = [self._ddp_group]
        else:
            return found_inf
        import torch.distributed as dist

        flag = torch.tensor([1.0 if found_inf else 0.0], dtype=torch.float32,
                            device=device or "cpu")
        for group in groups:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())
