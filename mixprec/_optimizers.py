"""Several optimizers for one model: ``wrap(model, [opt_g, opt_d], mode)``.

A GAN's generator and discriminator, or a separate optimizer for the embeddings,
train one model with several optimizers. The rules follow torch's ``GradScaler``
used with several optimizers (one scaler; ``scaler.scale(loss)`` per loss;
``scaler.step(opt_i)`` per optimizer, skipped if *its* gradients hold inf/NaN;
``scaler.update()`` once per iteration, backing off if any optimizer overflowed):

- ``model.precision`` (the *owner*) holds the mode, the model, the one loss scale
  and the checkpoint. Each optimizer gets its own :class:`~mixprec.PrecisionWrapper`
  (``opt_i.precision``, a *lane*) that shares them and has its own fp32 masters,
  unscaling, inf/NaN check, step counters and collapse diagnosis.
- ``opt_i.backward(loss)`` scales by the shared scale. The gradients go where
  autograd sends them (into the other optimizers' parameters too, as in plain
  torch: ``opt_j.zero_grad()`` clears them) and count as ``opt.backward`` gradients
  for every optimizer; in master-weight modes they are added to the masters of the
  optimizer holding each parameter.
- ``opt_i.step()`` unscales and checks only ``opt_i``'s gradients and skips only
  its own step.
- The scale is updated once per *round*: when every optimizer has stepped (taken or
  skipped) since the last update -- backing off once if any of those steps was
  skipped, else counting one clean step toward growth. A backward through an
  optimizer that already stepped in the open round closes the round first, so
  optimizers may step at different rates (a critic stepping five times per
  generator step: each extra critic step is a round of its own). An optimizer that
  steps again with no backward through it in between joins the open round (the
  scale never changes under gradients that were scaled by it and not yet stepped).
- ``model.precision.steps`` / ``skipped_steps`` count rounds (and rounds in which a
  step was skipped); ``opt_i.precision.steps`` / ``skipped_steps`` count ``opt_i``'s.
- ``model.precision.state_dict()`` (also ``opt_i.precision.state_dict()``) holds the
  model, every optimizer's state, the shared scaler and the open round (format in
  ``_checkpoint.py``); resuming is exact. ``opt_i.state_dict()`` loaded into the plain
  optimizer before wrap resumes ``opt_i``'s counters and the shared scale (as with one
  optimizer; the open round is only in the whole checkpoint).
- DDP works as with one optimizer (``mixprec.distributed.get_state_dict(model, opt_i,
  full_state_dict=True)`` takes any of them). Refused at wrap, before anything
  changes: a model sharded by ``mixprec.distributed.fully_shard`` (FSDP2) and a
  ``monitor`` (it observes one optimizer's steps); ``mixprec doctor`` trains with one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import _checkpoint
from ._convert import atomic, validate_modes
from ._master import MasterSet
from ._module import WrappedModule
from ._optimizer import WrappedOptimizer
from ._tensors import is_fully_sharded
from .exceptions import CheckpointError, OptimizerMismatchError, WrapError

if TYPE_CHECKING:
    from ._wrapper import PrecisionWrapper

__all__ = ["OptimizerSet", "wrap_several"]


def wrap_several(
    owner: PrecisionWrapper, model: torch.nn.Module, optimizers: Sequence[Any],
    lane_class: type[PrecisionWrapper],
) -> tuple[WrappedModule, tuple[WrappedOptimizer, ...]]:
    """``owner.wrap(model, optimizers)`` for a list or tuple of optimizers; atomic: if it
    raises, the model and every optimizer are as before. ``lane_class`` builds each
    optimizer's wrapper (``PrecisionWrapper``; passed in, as this module sits below it).
    A list of one is the one-optimizer wrap, its optimizer returned in a tuple."""
    if not optimizers:
        raise WrapError("wrap() got an empty list of optimizers; pass at least one, or none "
                        "to wrap the model alone.")
    if any(o is None for o in optimizers):
        raise WrapError("wrap() got None in its list of optimizers; pass torch.optim.Optimizer "
                        "objects only.")
    if len(optimizers) == 1:
        owner.wrap(model, optimizers[0])
        assert owner.module is not None and owner.optimizer is not None
        return owner.module, (owner.optimizer,)
    owner._validate(model, None)
    for index, optimizer in enumerate(optimizers):
        for earlier in range(index):
            if optimizers[earlier] is optimizer:
                raise OptimizerMismatchError(
                    f"The same optimizer is passed twice (at positions {earlier} and {index}); "
                    "pass each optimizer once."
                )
        owner._validate(model, optimizer)
    _check_disjoint(model, optimizers)
    if owner.monitor is not None:
        raise WrapError(
            "A monitor observes the steps of one optimizer, but wrap() got "
            f"{len(optimizers)}; wrap several optimizers without monitor=, or monitor a "
            "wrap with one optimizer."
        )
    if is_fully_sharded(model):
        raise WrapError(
            f"mixprec steps a fully_shard-ed (FSDP2) model with one optimizer, but wrap() got "
            f"{len(optimizers)}; give the parameters to one optimizer with several param "
            "groups, or train with DistributedDataParallel."
        )
    owner._dist.attach(model, owner.precision_mode, owner.optimizer_modes)  # refuses DDP(model)
    for optimizer in optimizers:
        validate_modes(model, optimizer, owner.precision_mode, owner.optimizer_modes)
    lanes = [lane_class([owner.precision_mode, *owner.optimizer_modes],
                        skip_nonfinite=owner.skip_nonfinite,
                        collapse_patience=owner.collapse_patience) for _ in optimizers]
    # mixprec state dicts loaded into the plain optimizers before wrap: checked now
    carried = [lane._carried_state(o) for lane, o in zip(lanes, optimizers, strict=True)]
    inners: list[torch.optim.Optimizer] = []
    with contextlib.ExitStack() as journals:
        for optimizer in optimizers:
            journals.enter_context(atomic(model, optimizer))
            _checkpoint.drop_carried_state(optimizer)
        lines, names_before = owner._convert_module(model)
        for index, (lane, optimizer) in enumerate(zip(lanes, optimizers, strict=True)):
            lane._names = owner._names  # one model: one table of names, masters added
            inner, more = lane._convert_optimizer(model, optimizer, names_before)
            inners.append(inner)
            count = sum(len(g["params"]) for g in inner.param_groups)
            lines += [f"optimizer {index}: {type(inner).__name__}, {count} parameters",
                      *(f"  {line}" for line in more)]
    if owner.scaler is not None:
        lines.append(f"dynamic loss scaling, shared by the {len(optimizers)} optimizers: "
                     f"{owner.scaler.scale:g} initial, {owner.scaler.config()}")
    module = WrappedModule(model, owner)
    several = OptimizerSet(owner, lanes)
    wrapped = []
    for lane, inner in zip(lanes, inners, strict=True):
        lane.module, lane.scaler, lane._dist = module, owner.scaler, owner._dist
        lane.summary_lines = lines
        lane._several = several
        lane.optimizer = WrappedOptimizer(inner, lane)
        wrapped.append(lane.optimizer)
    owner.module, owner.summary_lines, owner._several = module, lines, several
    owner.optimizers = tuple(wrapped)
    for lane in lanes:
        lane.optimizers = owner.optimizers
    parts = [lane.masters for lane in lanes if lane.masters is not None]
    owner.masters = MasterSet(parts) if parts else None
    for lane, state in zip(lanes, carried, strict=True):
        if state is not None:  # its counters, and the shared scale they were saved with
            lane.load_precision_state(state)
    return module, owner.optimizers


def _check_disjoint(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Refuse a parameter held by two optimizers: each would step it, the second on
    weights the first already moved, and masters would be made twice."""
    names = {id(p): n for n, p in model.named_parameters()}
    holder: dict[int, int] = {}
    for index, optimizer in enumerate(optimizers):
        for group in optimizer.param_groups:
            for p in group["params"]:
                first = holder.setdefault(id(p), index)
                if first != index:
                    raise OptimizerMismatchError(
                        f"Parameter {names.get(id(p), '?')!r} is in optimizers {first} and "
                        f"{index}; a parameter can be stepped by one optimizer only, so give "
                        "each optimizer its own parameters."
                    )


class OptimizerSet:
    """The optimizers wrapped with one model: their shared backward, the rounds of the
    shared loss scale, and the checkpoint (the rules are in the module docstring)."""

    def __init__(self, owner: PrecisionWrapper, lanes: Sequence[PrecisionWrapper]) -> None:
        self.owner = owner
        self.lanes = tuple(lanes)
        #: which optimizers stepped since the scale was last updated, and whether any
        #: of those steps was skipped
        self.stepped = [False] * len(self.lanes)
        self.found_inf = False

    def _index(self, lane: PrecisionWrapper) -> int | None:
        return next((i for i, one in enumerate(self.lanes) if one is lane), None)

    # -- training ----------------------------------------------------------------------

    def backward(self, via: PrecisionWrapper, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """``PrecisionWrapper.backward`` for every optimizer at once, through ``via``'s."""
        index = self._index(via)
        if index is not None and self.stepped[index]:
            self.close_round()  # via steps again: the round it stepped in is over
        scaler = self.owner.scaler
        if scaler is not None:
            loss = loss * scaler.scale
        for lane in self.lanes:
            if lane.masters is not None:
                lane.masters.drop_exposed_grads()  # the next gradients must not add to them
        loss.backward(*args, **kwargs)
        for lane in self.lanes:
            lane._backward_calls += 1
            # Under DDP no_sync() the gradients stay on the model until DDP reduces them.
            if lane.masters is not None and not lane._dist.holds_grads_on_model():
                lane.masters.accumulate_grads()

    def stepped_once(self, lane: PrecisionWrapper, found_inf: bool) -> None:
        """Called by ``lane`` after its step (taken or skipped): the round closes, and the
        scale is updated, once every optimizer has stepped."""
        index = self._index(lane)
        assert index is not None
        self.stepped[index] = True
        if found_inf:
            self.found_inf = True
            self.owner.last_nonfinite_param = lane.last_nonfinite_param
        if all(self.stepped):
            self.close_round()

    def close_round(self) -> None:
        """Update the shared scale from the steps of the open round (once), count it."""
        if not any(self.stepped):
            return
        owner = self.owner
        owner.steps += 1
        if self.found_inf:
            owner.skipped_steps += 1
            owner.skip_streak += 1
        else:
            owner.skip_streak = 0
        if owner.scaler is not None:
            owner.scaler.update(self.found_inf)
        self.stepped = [False] * len(self.lanes)
        self.found_inf = False

    def check_new_params(self, lane: PrecisionWrapper, params: Sequence[torch.Tensor]) -> None:
        """Refuse ``lane.add_param_group`` of parameters another optimizer holds."""
        mine = {id(p) for p in params}
        for index, other in enumerate(self.lanes):
            if other is lane:
                continue
            held = {id(p) for p in other.step_parameters()}
            if other.masters is not None:
                held |= {id(p) for p, _ in other.masters.pairs}
            if mine & held:
                taken = ", ".join(lane.param_name(p) for p in params if id(p) in held)
                raise OptimizerMismatchError(
                    f"add_param_group() got parameters optimizer {index} holds ({taken}); a "
                    "parameter can be stepped by one optimizer only."
                )

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The model, every optimizer's state dict (each with its ``"mixprec"`` entry) and
        the shared scaler and open round; loads with ``weights_only=True``."""
        owner = self.owner
        assert owner.module is not None
        entry = _checkpoint.several_state(owner.precision_state(), stepped=self.stepped,
                                          found_inf=self.found_inf)
        return {"model": owner.module.state_dict(),
                "optimizers": [lane._optimizer_state_dict() for lane in self.lanes],
                _checkpoint.KEY: entry}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore a :meth:`state_dict`; all or nothing: everything is validated first."""
        owner = self.owner
        assert owner.module is not None
        if not isinstance(state, Mapping) or "model" not in state:
            raise CheckpointError(
                "This is not a mixprec checkpoint (no 'model' entry); load the model and each "
                "optimizer's state dict with model.load_state_dict() / opt.load_state_dict()."
            )
        _checkpoint.check_optimizer_count(state, len(self.lanes))
        entry = state[_checkpoint.KEY]
        owner.check_precision_state(entry)
        owner._check_module_state(state["model"], strict)
        for lane, saved in zip(self.lanes, state["optimizers"], strict=True):
            inner, extra = _checkpoint.split_optimizer_state(saved)
            if extra is not None:
                lane.check_precision_state(extra)
            assert lane.optimizer is not None
            _checkpoint.check_optimizer_state(lane.optimizer.optimizer, inner)
        # Validated: apply, the model last (torch's module load is not atomic itself).
        for lane, saved in zip(self.lanes, state["optimizers"], strict=True):
            lane._load_optimizer_state_dict(saved)
        owner.load_precision_state(entry)
        self.stepped = list(entry["round"]["stepped"])
        self.found_inf = entry["round"]["found_inf"]
        owner.module.load_state_dict(state["model"], strict=strict)
