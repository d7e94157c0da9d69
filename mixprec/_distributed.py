"""mixprec inside torch.distributed: DDP and FSDP2 (``fully_shard``).

DDP: wrap first, then hand the wrapped model to ``DistributedDataParallel``
(``wrap(DDP(model))`` is refused with that advice). The wrapper notices the DDP
forward it runs in; where this step's gradients were not all-reduced (the step
is taken inside ``no_sync()``) it all-reduces the inf/NaN flag, so every rank
skips the same steps and holds the same loss scale. With fp32 master weights,
micro-batches under ``no_sync()`` keep their gradients on the model for DDP to
reduce instead of moving them into the (unreduced) masters.

FSDP2: :func:`fully_shard` converts the model for a mode on the unsharded model
and shards it with the mode's ``MixedPrecisionPolicy``; ``wrap`` then runs the
sharded model through the mode's :class:`FSDPPlan` (no second autocast for the
mixed modes, no second copy for master weights: the sharded fp32 parameters are
the masters). Gradients are sharded DTensors: inf/NaN checks read the local
shards and the flag is all-reduced over the mesh. A mode opts in to FSDP2 with a
method ``fsdp_plan() -> FSDPPlan``; an optimizer mode with ``fsdp_compatible = True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._interface import FSDPPlan, OptimizerMode, PrecisionMode
from ._tensors import ddp_class, device_of, is_fully_sharded
from .exceptions import CheckpointError, ModeOptionError, WrapError

if TYPE_CHECKING:
    from ._wrapper import PrecisionWrapper

__all__ = ["DistributedSync", "fully_shard", "get_state_dict", "set_state_dict"]


#: FSDP2 roots sharded by :func:`fully_shard`: the mode object that converted them,
#: its plan and the summary lines of the conversion.
_SHARDED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[PrecisionMode, FSDPPlan, list[str]]] = (
    weakref.WeakKeyDictionary())


# -- the wrapper's distributed state --------------------------------------------------------


class DistributedSync:
    """What one :class:`~mixprec.PrecisionWrapper` knows about the engine running it.

    ``engine`` is ``"ddp"`` once a forward ran inside a ``DistributedDataParallel``
    forward, ``"fsdp"`` for a model sharded by :func:`fully_shard`, else None.
    """

    def __init__(self) -> None:
        self.engine: str | None = None
        self._ddp_group: Any = None
        self._ddp_synced = True  # will the last DDP forward's backward all-reduce?
        self._mesh: Any = None

    # -- wrap ------------------------------------------------------------------------

    def attach(
        self, model: torch.nn.Module, mode: PrecisionMode, optimizer_modes: Sequence[OptimizerMode],
    ) -> PrecisionMode:
        """Check ``model`` can be wrapped as it is; return the mode to run it with.

        Raises before anything is changed: ``wrap(DDP(model))``, a model sharded by
        torch's own ``fully_shard``, or a mode other than the one it was sharded for.
        """
        if isinstance(mode, _ShardedMode):  # a retry of a failed wrap
            mode = mode.mode
        ddp = ddp_class()
        if ddp is not None and isinstance(model, ddp):
            raise WrapError(
                "wrap() got a DistributedDataParallel model; wrap the plain model first and "
                "give the result to DDP: model, opt = mixprec.wrap(model, opt, mode); "
                "model = DistributedDataParallel(model)."
            )
        if not is_fully_sharded(model):
            return mode
        record = _SHARDED.get(model)
        if record is None:
            raise WrapError(
                "This model was sharded with torch's fully_shard, so mixprec cannot convert "
                "it any more; shard the plain model with mixprec.distributed.fully_shard(model, "
                "mode, modules=...) instead, which converts it first and picks the matching "
                "MixedPrecisionPolicy."
            )
        sharded_mode, plan, lines = record
        if sharded_mode is not mode and (sharded_mode.name != mode.name
                                         or sharded_mode.options() != mode.options()):
            raise WrapError(
                f"The model was sharded for mode {sharded_mode.describe()!r} but wrap() asks "
                f"for {mode.describe()!r}; pass the same mode and options to wrap() as to "
                "mixprec.distributed.fully_shard()."
            )
        _check_optimizer_modes(optimizer_modes)
        self.engine = "fsdp"
        self._mesh = next((p.device_mesh for p in model.parameters()
                           if hasattr(p, "device_mesh")), None)
        return _ShardedMode(sharded_mode, plan, lines)

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

        flag = torch.tensor([1.0 if found_inf else 0.0], device=device or "cpu")
        for group in groups:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())


class _ShardedMode(PrecisionMode):
    """A mode run on a model :func:`fully_shard` converted and sharded for it."""

    master_weights = False  # the sharded parameters are what the optimizer steps

    def __init__(self, mode: PrecisionMode, plan: FSDPPlan, lines: list[str]) -> None:
        self.mode = mode
        self.plan = plan
        self.name = mode.name
        self.needs_scaling = mode.needs_scaling
        self._lines = lines

    def options(self) -> dict[str, Any]:
        return self.mode.options()

    def describe(self) -> str:
        return self.mode.describe()

    @property
    def param_dtype(self) -> torch.dtype | None:
        return self.plan.storage_dtype or self.mode.param_dtype

    def convert_module(self, module: torch.nn.Module) -> list[str]:
        return list(self._lines)  # converted and sharded by mixprec.distributed.fully_shard

    def init_context(self, device: torch.device | str | None = None) -> contextlib.AbstractContextManager[None]:
        return self.mode.init_context(device)

    def unwrap_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.mode.unwrap_module(module)

    def forward_context(self) -> contextlib.AbstractContextManager[None]:
        if self.plan.forward_context:
            return self.mode.forward_context()
        return contextlib.nullcontext()

    def convert_input(self, data: Any) -> Any:
        return self.mode.convert_input(data)

    def convert_output(self, data: Any) -> Any:
        return self.mode.convert_output(data)

    def create_scaler(self) -> Any:
        return self.mode.create_scaler()

    def optimizer_step_context(self, optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager[None]:
        return self.mode.optimizer_step_context(optimizer)

    def module_state_dict(self, module: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        return self.mode.module_state_dict(module, state)

    def load_module_state_dict(self, module: torch.nn.Module, state: Mapping[str, Any],
                               strict: bool) -> Any:
        return self.mode.load_module_state_dict(module, state, strict)

    def state_dict(self) -> dict[str, Any]:
        return self.mode.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mode.load_state_dict(state)


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


def _check_optimizer_modes(optimizer_modes: Sequence[OptimizerMode]) -> None:
    for om in optimizer_modes:
        if not getattr(om, "fsdp_compatible", False):
            provider = type(om).__module__.split(".")[0].replace("_", "-")
            raise WrapError(
                f"Optimizer mode {om.name!r} (from {provider}) cannot step the sharded "
                "(DTensor) parameters of a fully_shard-ed (FSDP2) model; use a plain torch "
                "optimizer with FSDP2, or train with DistributedDataParallel."
            )


# -- FSDP2 ------------------------------------------------------------------------------------


def fully_shard(
    model: torch.nn.Module,
    mode: Any = "32-true",
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

    from ._journal import Journal
    from ._module import is_wrapped
    from ._registry import registry

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
    _check_optimizer_modes(optimizer_modes)
    precision.validate(model, device_of(model))

    journal = Journal(model, None)
    try:
        lines = [f"mode: {precision.describe()}"]
        if plan.convert_module:
            lines += precision.convert_module(model)
        if plan.storage_dtype is not None:
            n = 0
            with torch.no_grad():
                for p in model.parameters():
                    if p.is_floating_point() and p.dtype is not plan.storage_dtype:
                        p.data = p.data.to(plan.storage_dtype)
                        n += 1
            if n:
                lines.append(f"sharded parameters kept in {plan.storage_dtype} "
                             f"({n} cast): they are what the optimizer steps")
    except BaseException:
        journal.rollback()
        raise
    policy = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=plan.reduce_dtype)
    for unit in units:
        torch_fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward,
                          mp_policy=policy, **extra)
    torch_fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward,
                      mp_policy=policy, **extra)
    lines.append(f"sharded with {plan.describe()}: {len(units) + 1} FSDP units")
    if not plan.forward_context:
        lines.append("no autocast: FSDP2 casts parameters and inputs to the compute dtype")
    _SHARDED[model] = (precision, plan, lines)
    return model


# -- checkpoints --------------------------------------------------------------------------------


def _parts(model: torch.nn.Module) -> tuple[PrecisionWrapper, torch.nn.Module]:
    from ._module import WrappedModule

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
    names = precision._names
    return [[names.get(id(p), "?") for p in g["params"]]
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
    optimizer (``step`` counts): save it before training on.

    .. versionadded:: 0.1
    """
    precision, inner = _parts(model)
    _check_optimizer(precision, optimizer)
    if precision._dist.engine != "fsdp":
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
    extra = precision._precision_state()
    if precision.optimizer is not None:
        optim = get_optimizer_state_dict(inner, precision.optimizer.optimizer, options=opts)
        if full_state_dict:
            if not out["model"]:  # not rank 0
                return {}
            optim = _fqn_to_index(optim)
            optim["mixprec"] = extra
        else:
            out["mixprec"] = extra
        out["optimizer"] = optim
    elif full_state_dict and not out["model"]:
        return {}
    else:
        out["mixprec"] = extra
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
    if precision._dist.engine != "fsdp":
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
            optim = dict(optim)
            extra = optim.pop("mixprec", None)
        else:
            extra = state.get("mixprec")
        if extra is not None and extra.get("mode") != precision.mode_name:
            precision._load_precision_state(extra)  # raises the mode-mismatch error
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
        precision._load_precision_state(extra)


def _check_optimizer(precision: PrecisionWrapper, optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is not None and optimizer is not precision.optimizer:
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
