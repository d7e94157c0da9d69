"""The user API of mixprec on FSDP2 and for distributed checkpoints:
:func:`fully_shard`, :func:`get_state_dict`, :func:`set_state_dict`
(re-exported by :mod:`mixprec.distributed`).

:func:`fully_shard` converts the model for a mode on the unsharded model (the same
validate -> convert-all-or-nothing sequence as ``wrap``, ``_convert.py``) and shards
it with the mode's ``MixedPrecisionPolicy``; ``wrap`` then runs the sharded model
through the mode's :class:`~mixprec.FSDPPlan` (recorded in ``_sync.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import _checkpoint
from ._convert import atomic, convert_module, validate_modes
from ._interface import FSDPPlan, PrecisionMode
from ._module import WrappedModule, is_wrapped
from ._registry import registry
from ._sync import ShardRecord, check_fsdp_optimizer_modes, record_sharded
from ._tensors import ddp_class, is_fully_sharded
from ._wrapper import ModeLike, PrecisionWrapper
from .exceptions import CheckpointError, ModeOptionError, WrapError

__all__ = ["fully_shard", "get_state_dict", "set_state_dict"]


def _plan_of(mode: PrecisionMode) -> FSDPPlan:
    plan = mode.fsdp_plan()
    if plan is None:
        provider = type(mode).__module__.split(".")[0].replace("_", "-")
        raise WrapError(
            f"Mode {mode.name!r} (from {provider}) cannot run on a fully_shard-ed (FSDP2) "
            "model: it declares no FSDP plan. Train it with DistributedDataParallel, or "
            "shard with a mode that supports FSDP2 (see the support matrix in the README)."
        )
    if not isinstance(plan, FSDPPlan):
        raise WrapError(f"Mode {mode.name!r}'s fsdp_plan() returned {type(plan).__name__}, "
                        "not a mixprec.distributed.FSDPPlan; fix the mode's plugin.")
    return plan


# -- FSDP2 ------------------------------------------------------------------------------------


def fully_shard(
    model: torch.nn.Module,
    mode: ModeLike = "32-true",
    *,
    modules: Iterable[torch.nn.Module] | None = None,
    autocast: bool = False,
    mesh: Any = None,
    reshard_after_forward: bool | int | None = True,
    fsdp_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> torch.nn.Module:
    """Convert ``model`` for ``mode`` and shard it with FSDP2, with the mode's policy.

    Each module in ``modules`` (e.g. the transformer blocks) becomes its own FSDP
    unit, then the root does. Build the optimizer on the returned (same) model
    afterwards and wrap both with the same mode: ``mixprec.wrap(model, opt, mode)``.

    :param mode: a mode string with optional optimizer modes, or a mode object.
    :param modules: submodules to shard as their own units (None: the root only).
    :param autocast: also run the mode's autocast inside the sharded forward (mixed
        modes): keeps autocast's fp32 ops (norms, softmax) in fp32 and lets fp32
        buffers meet low-precision activations, at the cost of a second cast.
    :param mesh: the ``DeviceMesh`` to shard over (None: all ranks).
    :param reshard_after_forward: passed to torch's ``fully_shard``.
    :param fsdp_kwargs: more keyword arguments for torch's ``fully_shard``
        (``offload_policy``, ``shard_placement_fn``, …); not ``mp_policy``.
    :param options: options for the mode named by ``mode`` (``master_weights=True``).

    .. versionadded:: 0.1
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    if not isinstance(model, torch.nn.Module):
        raise WrapError(f"fully_shard() needs a torch.nn.Module, got {type(model).__name__}.")
    if is_wrapped(model):
        raise WrapError(
            "fully_shard() got a model wrapped by mixprec; shard the plain model first, build "
            "the optimizer on it, then wrap: mixprec.wrap(model, opt, mode)."
        )
    if is_fully_sharded(model):
        raise WrapError("This model is already sharded with fully_shard; pass the unsharded "
                        "model to mixprec.distributed.fully_shard().")
    if not (dist.is_available() and dist.is_initialized()):
        raise WrapError("fully_shard() needs torch.distributed: call "
                        "torch.distributed.init_process_group() first (torchrun sets it up).")
    extra = dict(fsdp_kwargs or {})
    if "mp_policy" in extra:
        raise ModeOptionError("fully_shard() picks mp_policy from the mode; leave it out of "
                              "fsdp_kwargs (or choose a mode with the dtypes you want).")
    units = [] if modules is None else list(modules)
    inside = {id(m) for m in model.modules()}
    if any(id(m) not in inside or m is model for m in units):
        raise WrapError("Every entry of modules= must be a submodule of the model (not the "
                        "model itself); pass e.g. modules=model.blocks.")
    precision, optimizer_modes = registry().build(mode, options)
    plan = _plan_of(precision)
    if autocast:
        plan = dataclasses.replace(plan, forward_context=True)
    check_fsdp_optimizer_modes(optimizer_modes)
    validate_modes(model, None, precision, ())

    with atomic(model, None):
        if plan.convert_module:
            lines, _ = convert_module(precision, model, plan.storage_dtype)
        else:
            lines = [f"mode: {precision.describe()}"]
    policy = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=plan.reduce_dtype)
    for unit in units:
        torch_fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward,
                          mp_policy=policy, **extra)
    torch_fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward,
                      mp_policy=policy, **extra)
    lines.append(f"sharded with {plan.describe()}: {len(units) + 1} FSDP units")
    if not plan.forward_context:
        lines.append("no autocast: FSDP2 casts parameters and inputs to the compute dtype")
    record_sharded(model, ShardRecord(precision, plan, tuple(lines)))
    return model


# -- checkpoints --------------------------------------------------------------------------------


def _parts(model: torch.nn.Module) -> tuple[PrecisionWrapper, torch.nn.Module]:
    inner = model
    ddp = ddp_class()
    if ddp is not None and isinstance(inner, ddp):
        inner = inner.module
    if not isinstance(inner, WrappedModule):
        raise CheckpointError(
            "get_state_dict()/set_state_dict() need the model mixprec.wrap() returned "
            "(or DDP around it); wrap the model first."
        )
    return inner.precision, inner.module


def _optimizer_names(precision: PrecisionWrapper) -> list[list[str]]:
    assert precision.optimizer is not None
    return [[precision.param_name(p) for p in g["params"]]
            for g in precision.optimizer.optimizer.param_groups]


def get_state_dict(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
    full_state_dict: bool = False,
) -> dict[str, Any]:
    """The checkpoint of a wrapped model (and optimizer) on DDP or FSDP2.

    ``full_state_dict=False`` (FSDP2): sharded, for ``torch.distributed.checkpoint``
    (``dcp.save(state, checkpoint_id=path)``); every rank calls it and saves.
    ``full_state_dict=True``: the single-process format of
    ``PrecisionWrapper.state_dict()``, loadable by a single-process ``wrap`` in the
    same mode; under FSDP2 gathered to full CPU tensors on rank 0 (other ranks get an
    empty dict), under DDP the replica's own ``state_dict()`` on every rank. Every
    rank must call it. Like torch's state dicts, it may share tensors with the live
    optimizer (``step`` counts): save it before training on. A model wrapped with
    several optimizers (DDP) gives all of them: pass any one as ``optimizer``.

    .. versionadded:: 0.1
    """
    precision, inner = _parts(model)
    _check_optimizer(precision, optimizer)
    if precision.fsdp_plan is None:
        if not full_state_dict:
            raise CheckpointError(
                "Sharded checkpoints are for fully_shard-ed (FSDP2) models; DDP replicas are "
                "identical: save get_state_dict(model, opt, full_state_dict=True) on rank 0."
            )
        return precision.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=full_state_dict, cpu_offload=full_state_dict)
    out: dict[str, Any] = {"model": get_model_state_dict(inner, options=opts)}
    extra = precision.precision_state()
    if precision.optimizer is not None:
        optim = get_optimizer_state_dict(inner, precision.optimizer.optimizer, options=opts)
        if full_state_dict:
            if not out["model"]:  # not rank 0
                return {}
            optim = _fqn_to_index(optim)
            optim[_checkpoint.KEY] = extra
        else:
            out[_checkpoint.KEY] = extra
        out["optimizer"] = optim
    elif full_state_dict and not out["model"]:
        return {}
    else:
        out[_checkpoint.KEY] = extra
    return out


def set_state_dict(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: Mapping[str, Any], *,
    full_state_dict: bool = False, broadcast_from_rank0: bool = False,
) -> None:
    """Load what :func:`get_state_dict` returned (after ``dcp.load`` for sharded ones).

    ``full_state_dict=True`` takes the single-process format (a checkpoint from
    ``get_state_dict(..., full_state_dict=True)`` or from a single-process
    ``PrecisionWrapper.state_dict()`` in the same mode) on every rank, or on rank 0
    only with ``broadcast_from_rank0=True`` (FSDP2). Every rank must call it.

    .. versionadded:: 0.1
    """
    precision, inner = _parts(model)
    _check_optimizer(precision, optimizer)
    if precision.fsdp_plan is None:
        if not full_state_dict:
            raise CheckpointError(
                "Sharded checkpoints are for fully_shard-ed (FSDP2) models; under DDP load "
                "the full checkpoint: set_state_dict(model, opt, state, full_state_dict=True)."
            )
        precision.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    have = bool(state) or not broadcast_from_rank0
    if have and "model" not in state:
        raise CheckpointError("This is not a mixprec checkpoint (no 'model' entry); pass what "
                              "mixprec.distributed.get_state_dict() returned.")
    extra = None
    optim = state.get("optimizer") if have else None
    if have:
        if full_state_dict and optim is not None:
            optim, extra = _checkpoint.split_optimizer_state(optim)
        else:
            extra = state.get(_checkpoint.KEY)
        if extra is not None:
            _checkpoint.check_mode(extra, precision.mode_name)  # before anything is loaded
    opts = StateDictOptions(full_state_dict=full_state_dict,
                            broadcast_from_rank0=broadcast_from_rank0)
    # torch writes DTensors into the dict it is given: copy, the caller's stays as it was
    set_model_state_dict(inner, dict(state["model"]) if have else {}, options=opts)
    if precision.optimizer is not None:
        if full_state_dict and optim is not None:
            optim = _index_to_fqn(optim, _optimizer_names(precision))
        set_optimizer_state_dict(inner, precision.optimizer.optimizer,
                                 optim if optim is not None else {}, options=opts)
    if broadcast_from_rank0:
        import torch.distributed as dist

        box = [extra]
        dist.broadcast_object_list(box, src=0)
        extra = box[0]
    if extra is not None:
        precision.load_precision_state(extra)


def _check_optimizer(precision: PrecisionWrapper, optimizer: torch.optim.Optimizer | None) -> None:
    # Several optimizers (DDP only): the full checkpoint holds them all, pass any of them.
    if optimizer is not None and not any(optimizer is o for o in precision.optimizers):
        raise CheckpointError("The optimizer is not the one wrapped with this model; pass the "
                              "optimizer mixprec.wrap() returned with it.")


def _fqn_to_index(optim: Mapping[str, Any]) -> dict[str, Any]:
    """torch's FQN-keyed optimizer state dict -> ``Optimizer.state_dict()``'s numbering."""
    index: dict[str, int] = {}
    groups = []
    for group in optim["param_groups"]:
        ids = [index.setdefault(fqn, len(index)) for fqn in group["params"]]
        groups.append({**group, "params": ids})
    state = {index[fqn]: value for fqn, value in optim["state"].items()}
    return {"state": state, "param_groups": groups}


def _index_to_fqn(optim: Mapping[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """``Optimizer.state_dict()``'s numbering -> torch's FQN keys, by this optimizer's order."""
    groups = optim["param_groups"]
    if [len(g["params"]) for g in groups] != [len(n) for n in names]:
        raise CheckpointError(
            f"The checkpoint's optimizer has groups of {[len(g['params']) for g in groups]} "
            f"parameters but this one has {[len(n) for n in names]}; build the optimizer "
            "with the same parameter groups as the run that saved it."
        )
    fqn = {i: name for g, group_names in zip(groups, names)
           for i, name in zip(g["params"], group_names)}
    return {
        "state": {fqn[i]: value for i, value in optim["state"].items()},
        "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in groups],
    }
