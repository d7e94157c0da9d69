"""mixprec on torch.distributed: DistributedDataParallel and FSDP2.

**DDP** — wrap first, then DDP::

    model, opt = mixprec.wrap(model, opt, mode="16-mixed")
    model = DistributedDataParallel(model)
    loss = loss_fn(model(x), y); opt.backward(loss); opt.step(); opt.zero_grad()

``mixprec.wrap(DistributedDataParallel(model), …)`` is refused with that advice.
Every rank skips the same steps and keeps the same loss scale, also when a step
is taken inside ``model.no_sync()`` (then the inf/NaN flag is all-reduced). With
fp32 master weights, micro-batches under ``no_sync()`` leave their gradients on
the model, where DDP reduces them at the synchronising backward. Checkpoint on
rank 0 with ``get_state_dict(model, opt, full_state_dict=True)`` (replicas are
identical) and load on every rank with ``set_state_dict(..., full_state_dict=True)``.

**FSDP2** — shard with :func:`fully_shard` (converts the model for the mode, then
calls torch's ``fully_shard`` with the mode's ``MixedPrecisionPolicy``), build the
optimizer, then wrap in the same mode::

    model = mixprec.distributed.fully_shard(model, "bf16-mixed", modules=model.blocks)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = mixprec.wrap(model, opt, "bf16-mixed")

Mixed modes run without autocast (FSDP2 casts the fp32 sharded parameters to the
compute dtype and reduces gradients in fp32); ``bf16-true``/``16-true`` with
``master_weights=True`` keep fp32 sharded parameters as the masters. Sharded
checkpoints: ``dcp.save(get_state_dict(model, opt), checkpoint_id=path)`` and,
to resume, ``state = get_state_dict(model, opt); dcp.load(state, checkpoint_id=path);
set_state_dict(model, opt, state)``. ``get_state_dict(..., full_state_dict=True)``
gives rank 0 the single-process checkpoint format.

Modes opt in to FSDP2 with a method ``fsdp_plan() -> FSDPPlan``; optimizer modes
with an attribute ``fsdp_compatible = True``. Others are refused with an error
naming the mode.
"""

from __future__ import annotations

from ._fsdp import fully_shard, get_state_dict, set_state_dict
from ._interface import FSDPPlan

__all__ = ["FSDPPlan", "fully_shard", "get_state_dict", "set_state_dict"]
