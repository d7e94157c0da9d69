"""``PrecisionWrapper``: one mode applied to one model and its optimizer."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast, overload

import torch

from . import _checkpoint
from ._convert import atomic, convert_module, match_state_dtypes, remap_optimizer, validate_modes
from ._interface import FSDPPlan, OptimizerMode, PrecisionMode, StepHooks, wide_grads
from ._master import MasterWeights
from ._module import (
    WrappedModule,
    check_forward_methods,
    check_not_wrapped,
    split_compiled,
)
from ._optimizer import WrappedOptimizer
from ._optimizers import OptimizerSet, wrap_several
from ._options import check_bool, check_number
from ._registry import registry
from ._resume import WrapperCheckpoints
from ._scaler import (
    grad_is_finite,
    non_finite_found,
    unscale_and_check,
    unscale_fp16_wide,
)
from ._sync import DistributedSync
from ._tensors import is_dtensor, total_grad_norm
from ._warn import warn_user
from .exceptions import (
    AlreadyWrappedError,
    BackwardError,
    CheckpointError,
    OptimizerMismatchError,
    WrapError,
)

__all__ = ["ModeLike", "OptimizerLike", "PrecisionWrapper"]

logger = logging.getLogger("mixprec")

ModeLike = str | PrecisionMode | OptimizerMode | Sequence[str | PrecisionMode | OptimizerMode]
#: what ``wrap`` takes as its optimizer: one, several (a list or tuple), or none
OptimizerLike = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None


class PrecisionWrapper(WrapperCheckpoints):
    """Applies a precision mode (and optional optimizer mode) to a model and optimizer.

    Owns the forward contexts, dynamic loss scaling, fp32 master weights and the
    checkpoint format. ``wrap()`` builds one; it is reachable from both returned
    objects as ``model.precision`` and ``opt.precision``.

    :param mode: a mode string (``"bf16-true+adamw8bit"``), a mode object, or a list.
    :param skip_nonfinite: skip optimizer steps whose gradients hold inf/NaN in
        every mode (not only the loss-scaled ones). Costs one read of the gradients.
    :param collapse_patience: after this many skipped steps in a row, warn with a
        diagnosis naming the first parameter whose gradient was not finite.
    :param forward_methods: names of the model's methods besides ``forward`` that run
        under the mode (``("generate", "encode")``): inputs converted, the forward
        context, output converted. Default: ``("generate",)`` where the model has a
        ``generate`` method (transformers, peft), else none; ``()`` for none.
    :param options: options for the precision mode named by a string
        (``master_weights=True``, ``init_scale=1024``, …).
    """

    def __init__(
        self, mode: ModeLike = "32-true", *, skip_nonfinite: bool = True,
        collapse_patience: int = 50, monitor: StepHooks | None = None,
        forward_methods: Sequence[str] | None = None, **options: Any,
    ) -> None:
        if isinstance(forward_methods, str):
            raise WrapError(f"forward_methods takes a list of method names; write "
                            f"forward_methods=({forward_methods!r},).")
        #: the model's methods run under the mode (None: generate where the model has it)
        self.forward_methods = None if forward_methods is None else tuple(forward_methods)
        #: wrap(torch.compile(model)): (the plain module inside, the compiled module)
        self._compiled: tuple[torch.nn.Module, torch.nn.Module] | None = None
        self.skip_nonfinite = check_bool(skip_nonfinite, "skip_nonfinite")
        self.collapse_patience = check_number(collapse_patience, "collapse_patience",
                                              minimum=1, integer=True)
        self.precision_mode, self.optimizer_modes = registry().build(mode, options)
        #: an observer of training steps (``mixprec.Monitor``), attached at wrap
        self.monitor = monitor
        self.mode_name = "+".join([self.precision_mode.name, *(m.name for m in self.optimizer_modes)])
        self.scaler = self.precision_mode.create_scaler()
        self.module: WrappedModule | None = None
        self.optimizer: WrappedOptimizer | None = None
        #: every optimizer wrapped with the model (``wrap(model, [opt_a, opt_b])``: the
        #: model's wrapper has no ``optimizer``; each optimizer's wrapper is in
        #: ``opt.precision``, sharing one OptimizerSet: see ``_optimizers.py``)
        self.optimizers: tuple[WrappedOptimizer, ...] = ()
        self._several: OptimizerSet | None = None
        self.masters: MasterWeights | None = None
        self.summary_lines: list[str] = []
        #: steps taken and steps skipped because of inf/NaN gradients
        self.steps = 0
        self.skipped_steps = 0
        #: skipped steps in a row, and the parameter whose gradient was first non-finite
        self.skip_streak = 0
        self.last_nonfinite_param: str | None = None
        self._names: dict[int, str] = {}
        self._backward_calls = 0
        self._unscaled = False
        self._found_inf = False
        #: fp16 gradients unscaled in fp32 this step: id(param) -> (fp32, grad, version)
        self._wide: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        #: DDP / FSDP2 state: flag all-reduce, gradients held under no_sync (_sync.py)
        self._dist = DistributedSync()
        #: the FSDP2 plan of a model mixprec.distributed.fully_shard converted, else None
        self.fsdp_plan: FSDPPlan | None = None
        self._shard_lines: tuple[str, ...] = ()

    @classmethod
    def _for_copy(cls, module: WrappedModule) -> PrecisionWrapper:
        self = cls(module._mode)
        self.module = module
        return self

    # -- summary -----------------------------------------------------------------

    @property
    def summary(self) -> str:
        """What wrapping changed, one fact per line."""
        return "\n".join(self.summary_lines)

    @property
    def loss_scale(self) -> float | None:
        """The current loss scale, or None in modes that do not scale."""
        return None if self.scaler is None else self.scaler.scale

    def audit(self, *, output: Any = None, loss: torch.Tensor | None = None,
              show: bool = True) -> Any:
        """The dtype and place of everything training touches — weights, gradients,
        masters, optimizer state, the forward output and the loss, the loss scale, the
        DDP/FSDP2 reduce and all-gather dtypes — with flags for silent downgrades.
        Printed unless ``show`` is False; returns a ``mixprec._audit.Audit``."""
        from . import _audit

        return _audit.audit(self, output=output, loss=loss, show=show)

    def __repr__(self) -> str:
        return f"PrecisionWrapper(mode={self.mode_name!r})"

    # -- running the model outside its forward -------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the wrapped forward runs in — ``torch.autocast`` in the mixed
        modes, the default dtype in the true modes, a plugin mode's own (FP8 autocast)
        — for code that runs the model outside its forward (``with
        model.precision.autocast(): model.module.encode(x)``). Inputs are not
        converted in it: see :meth:`convert_input`, or name the method in
        ``forward_methods`` / ``model.mark_forward_method(name)`` to have both."""
        plan = self.fsdp_plan
        if plan is not None and not plan.forward_context:
            return contextlib.nullcontext()
        return self.precision_mode.forward_context()

    def convert_input(self, data: Any) -> Any:
        """``data`` (nested tensors) converted as the wrapped forward converts its
        arguments (floating-point tensors to the compute dtype in the true modes)."""
        return self.precision_mode.convert_input(data)

    def convert_output(self, data: Any) -> Any:
        """``data`` converted as the wrapped forward converts its result (fp32 outputs
        in the mixed and 16-bit true modes, unless ``keep_output_dtype=True``)."""
        return self.precision_mode.convert_output(data)

    # -- building ----------------------------------------------------------------

    def init_module(self, device: torch.device | str | None = None) -> contextlib.AbstractContextManager[None]:
        """A context in which models are built in this mode's dtype (and on ``device``,
        which may be ``"meta"``): a bf16 model never exists in fp32."""
        return self.precision_mode.init_context(device)

    @overload
    def wrap(self, model: torch.nn.Module, optimizer: None = None) -> WrappedModule: ...
    @overload
    def wrap(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[WrappedModule, WrappedOptimizer]: ...
    @overload
    def wrap(
        self, model: torch.nn.Module, optimizer: Sequence[torch.optim.Optimizer]
    ) -> tuple[WrappedModule, tuple[WrappedOptimizer, ...]]: ...

    def wrap(
        self, model: torch.nn.Module, optimizer: OptimizerLike = None
    ) -> WrappedModule | tuple[WrappedModule, WrappedOptimizer | tuple[WrappedOptimizer, ...]]:
        """Apply the mode to ``model`` (and ``optimizer``); atomic: on error nothing changed.

        A list or tuple of optimizers gives a tuple of wrapped optimizers sharing one
        loss scale and checkpoint (rules in ``_optimizers.py`` and the README's
        "Several optimizers"); a list of one is the one-optimizer wrap.

        A module compiled with ``torch.compile`` is wrapped as the plain module inside
        it (eager's parameter names and state-dict keys); the wrapped forward calls the
        compiled one.
        """
        model, compiled = split_compiled(model)
        if compiled is not None:
            self._compiled = (model, compiled)
        check_forward_methods(model, self.forward_methods)
        if isinstance(optimizer, (list, tuple)):
            return wrap_several(self, model, optimizer, PrecisionWrapper)
        # anything else is refused by _validate as not an optimizer
        single = cast("torch.optim.Optimizer | None", optimizer)
        self._validate(model, single)
        # torch.distributed: refuses wrap(DDP(model)); a model sharded by
        # mixprec.distributed.fully_shard runs the mode object that converted it, by its plan.
        record = self._dist.attach(model, self.precision_mode, self.optimizer_modes)
        if record is not None:
            self.precision_mode, self.fsdp_plan = record.mode, record.plan
            self._shard_lines = record.lines
        validate_modes(model, single, self.precision_mode, self.optimizer_modes)
        carried = self._carried_state(single)
        try:
            with atomic(model, single):
                if carried is not None:
                    _checkpoint.drop_carried_state(single)
                inner_opt = self._convert(model, single)
        except BaseException:
            self.masters = None
            raise
        if carried is not None:
            self.load_precision_state(carried)
            scale = "" if self.scaler is None else f", loss scale {self.scaler.scale:g}"
            self.summary_lines.append(
                f"resumed from the mixprec state loaded into the optimizer before wrap: "
                f"step {self.steps}, {self.skipped_steps} skipped{scale}")
        self.module = WrappedModule(model, self)
        if inner_opt is not None:
            self.optimizer = WrappedOptimizer(inner_opt, self)
            self.optimizers = (self.optimizer,)
        if self.monitor is not None:
            self.monitor.attach(self)
        logger.info("mixprec: wrapped with %s\n%s", self.mode_name, self.summary)
        if self.optimizer is None:
            return self.module
        return self.module, self.optimizer

    def _validate(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise WrapError(f"wrap() needs a torch.nn.Module, got {type(model).__name__}.")
        check_not_wrapped(model)  # nor a part of a wrapped model
        if self.module is not None:
            raise AlreadyWrappedError(
                "This PrecisionWrapper already wraps a model; create a new one for another model."
            )
        if optimizer is None:
            return
        if isinstance(optimizer, WrappedOptimizer):
            raise AlreadyWrappedError(
                "This optimizer is already wrapped by mixprec; pass the plain torch optimizer."
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise WrapError(f"wrap() needs a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        own = {id(p) for p in model.parameters()}
        foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]
        if foreign:
            raise OptimizerMismatchError(
                f"The optimizer holds {len(foreign)} parameter(s) that are not the model's; "
                "mixprec converts only the model, so make them part of the model (e.g. an "
                "nn.Parameter attribute) or give them their own optimizer."
            )

    def _carried_state(self, optimizer: torch.optim.Optimizer | None) -> Any:
        """The ``"mixprec"`` entry of a mixprec optimizer state dict the user loaded into
        the plain ``optimizer`` before wrap (torch keeps it in the param groups), checked
        against this wrapper as any checkpoint is; None if there is none."""
        carried = None if optimizer is None else _checkpoint.carried_state(optimizer)
        if carried is None:
            return None
        try:
            self.check_precision_state(carried)
        except CheckpointError as exc:
            raise CheckpointError(
                f"The optimizer holds state loaded from a mixprec checkpoint before wrap that "
                f"this wrap cannot resume: {exc} To start with a fresh loss scale and step "
                "counters instead, remove it first: for g in opt.param_groups: "
                "g.pop('mixprec', None)."
            ) from None
        return carried

    def _convert(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> torch.optim.Optimizer | None:
        lines, names_before = self._convert_module(model)
        if optimizer is not None:
            optimizer, more = self._convert_optimizer(model, optimizer, names_before)
            lines += more
            if self.scaler is not None:
                lines.append(f"dynamic loss scaling: {self.scaler.scale:g} initial, "
                             f"{self.scaler.config()}")
        self.summary_lines = lines
        return optimizer

    def _convert_module(self, model: torch.nn.Module) -> tuple[list[str], dict[int, list[str]]]:
        """Convert the model; return the summary lines and the parameters' names before."""
        if self.fsdp_plan is None:
            lines, names_before = convert_module(self.precision_mode, model)
        else:  # converted and sharded by mixprec.distributed.fully_shard
            lines, names_before = list(self._shard_lines), {}
        self._names = {id(p): n for n, p in model.named_parameters()}
        return lines, names_before

    def _convert_optimizer(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        names_before: dict[int, list[str]],
    ) -> tuple[torch.optim.Optimizer, list[str]]:
        """Point ``optimizer`` at the converted model, make its masters, run the optimizer
        modes; return the optimizer to step and the summary lines."""
        names_after = dict(model.named_parameters(remove_duplicate=False))
        lines = remap_optimizer(optimizer, names_before, names_after)
        # Under FSDP2 the sharded parameters are what the optimizer steps (the plan's
        # storage dtype): no second copy.
        if self.precision_mode.master_weights and self.fsdp_plan is None:
            self.masters = MasterWeights(optimizer)
            for model_param, master in self.masters.pairs:
                self._names[id(master)] = self._names.get(id(model_param), "?")
            lines.append(self.masters.describe())
        with self.precision_mode.optimizer_step_context(optimizer):
            match_state_dtypes(optimizer)
        param_names = {p: self._names.get(id(p), "?") for g in optimizer.param_groups
                       for p in g["params"]}
        for om in self.optimizer_modes:
            optimizer, more = om.convert_optimizer(optimizer, model, param_names)
            lines += [f"optimizer mode: {om.describe()}", *more]
        return optimizer, lines

    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a param group of the model's parameters (masters are made for it).

        Validated as ``wrap`` and torch do: only trainable parameters of the wrapped
        model, none already in the optimizer.
        """
        assert self.optimizer is not None and self.module is not None
        inner = self.optimizer.optimizer
        params = group.get("params") if isinstance(group, dict) else None
        params = [params] if isinstance(params, torch.Tensor) else list(params or [])
        own = {id(p) for p in self.module.module.parameters()}
        held = {id(p) for p in self.step_parameters()}
        if self.masters is not None:
            held |= {id(p) for p, m in self.masters.pairs if id(m) in held}
        if not params:
            raise WrapError("add_param_group() needs a dict with a non-empty 'params' list of "
                            "the model's parameters.")
        if any(id(p) not in own for p in params):
            raise OptimizerMismatchError(
                "add_param_group() got parameters that are not the wrapped model's; mixprec "
                "converts only the model, so make them part of it or give them their own "
                "optimizer."
            )
        again = [self.param_name(p) for p in params if id(p) in held]
        if again or len({id(p) for p in params}) != len(params):
            raise OptimizerMismatchError(
                f"add_param_group() got parameters the optimizer already holds "
                f"({', '.join(again) or 'the same parameter twice'}); a parameter can be in "
                "one group only."
            )
        if self._several is not None:
            self._several.check_new_params(self, params)
        if self.masters is not None:
            group = self.masters.add_group(group)
            for model_param, master in self.masters.pairs:
                self._names.setdefault(id(master), self._names.get(id(model_param), "?"))
        inner.add_param_group(group)

    # -- training ------------------------------------------------------------------

    def step_parameters(self) -> list[torch.Tensor]:
        """The tensors the inner optimizer steps (fp32 masters where they exist)."""
        assert self.optimizer is not None
        return [p for g in self.optimizer.optimizer.param_groups for p in g["params"]]

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward with the current loss scale; in master-weight modes the
        gradients are then added to the fp32 masters' gradients."""
        if self._several is not None:  # several optimizers: for all of them at once
            self._several.backward(self, loss, *args, **kwargs)
            return
        if self.scaler is not None:
            loss = loss * self.scaler.scale
        if self.masters is not None:
            self.masters.drop_exposed_grads()  # the next gradients must not add to them
        loss.backward(*args, **kwargs)
        self._backward_calls += 1
        # Under DDP no_sync() the gradients stay on the model until DDP reduces them.
        if self.masters is not None and not self._dist.holds_grads_on_model():
            self.masters.accumulate_grads()

    def unscale_(self, check: bool = True, expose: bool = False) -> None:
        """Unscale the gradients and check them for inf/NaN, once per step.

        :param check: False when the caller checks the gradients itself (a norm).
        :param expose: in master-weight modes, also show the true gradients on the
            model's parameters (``opt.unscale_()`` does, for torch utilities on
            ``model.parameters()``); changes made to them are used by the step.
        """
        if self._unscaled:
            if expose and self.masters is not None:
                self.masters.expose_grads()
            return
        if self.scaler is not None and self._backward_calls == 0 and self._any_grad():
            raise BackwardError(
                f"Gradients were computed with loss.backward(), but mode {self.mode_name!r} "
                "scales the loss; call opt.backward(loss) instead so the gradients are scaled "
                "and unscaled correctly."
            )
        if self.masters is not None:
            self.masters.accumulate_grads()  # gradients from a plain loss.backward()
        with_grads = [(p, p.grad) for p in self.step_parameters() if p.grad is not None]
        grads = [g for _, g in with_grads]
        self._wide = {}
        if self.scaler is not None:
            narrow = [(p, g) for p, g in with_grads if g.dtype is torch.float16
                      and g.layout is torch.strided and not is_dtensor(g)]
            found_wide, wide = unscale_fp16_wide([g for _, g in narrow], self.scaler.scale)
            self._wide = {id(p): (w, g, g._version)
                          for (p, g), w in zip(narrow, wide, strict=True)}
            rest = [g for p, g in with_grads if id(p) not in self._wide]
            self._found_inf = unscale_and_check(rest, self.scaler.scale) or found_wide
        elif self.skip_nonfinite and check:
            self._found_inf = non_finite_found(grads)
        else:
            self._found_inf = False
        # Every rank must skip the same steps: all-reduce the flag where gradients
        # differ between ranks (FSDP2 shards, DDP no_sync steps).
        self._found_inf = self._dist.agree(self._found_inf, grads[0].device if grads else None)
        self._unscaled = True
        if expose and self.masters is not None:
            self.masters.expose_grads()

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> torch.Tensor:
        """Clip the true (unscaled) gradients' norm; returns the norm before clipping.

        Where nothing is scaled, the norm doubles as the inf/NaN check: it is finite
        exactly when every gradient is (barring gradients near the dtype's maximum,
        whose step is worth skipping too), so the gradients are read once, as in a
        plain torch loop.
        """
        # A p-norm (p > 0, inf included) of gradients holding inf/NaN is inf/NaN; a
        # "norm" of order 0 (a count) or -inf (a minimum) is not, and cannot be reused.
        reuse = (self.scaler is None and self.skip_nonfinite and not self._unscaled
                 and self._dist.engine is None and norm_type > 0)
        self.unscale_(check=not reuse)
        params = self.step_parameters()
        if self._dist.engine == "fsdp":  # DTensor gradients: torch reduces the norm
            norm = torch.nn.utils.clip_grad_norm_(
                params, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite,
                foreach=foreach)
        else:
            norm = total_grad_norm([p.grad for p in params if p.grad is not None], norm_type)
            if error_if_nonfinite and not bool(torch.isfinite(norm)):
                raise RuntimeError(
                    f"The total norm of order {norm_type} of the gradients is non-finite, so it "
                    "cannot be clipped; pass error_if_nonfinite=False to skip such steps instead."
                )
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=foreach)
        if reuse:
            self._found_inf = not bool(torch.isfinite(norm).item())
        return norm

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Unscale, skip the step on inf/NaN gradients, step, update the scale.

        With a ``closure`` (which computes the loss and its gradients), the closure is
        evaluated first and the step then keeps every guarantee of a normal one
        (inf/NaN check, masters written back); optimizers that evaluate it again
        (L-BFGS) get the model's current weights for each evaluation. Returns the
        closure's loss, or None without a closure.
        """
        assert self.optimizer is not None, "step() needs a wrapped optimizer"
        inner = self.optimizer.optimizer
        result: Any = None
        if closure is not None:
            if self.scaler is not None:
                raise BackwardError(
                    f"Mode {self.mode_name!r} scales the loss, which optimizer closures cannot "
                    "take part in; compute the loss, call opt.backward(loss), then opt.step()."
                )
            with torch.enable_grad():
                result = closure()
        if self.masters is not None:
            self.masters.refresh_stale()  # other code wrote the model: it wins
        self.unscale_()
        if self.monitor is not None:
            self.monitor.before_step(self)
        if self._found_inf:
            self._record_skip()
        else:
            if self.masters is not None:
                self.masters.take_grad_edits()  # clipping done on model.parameters()
            # fp16 gradients unscaled in fp32, unless other code changed them since
            wide = {k: w for k, (w, g, v) in self._wide.items() if g._version == v}
            with wide_grads(wide), self.precision_mode.optimizer_step_context(inner):
                if closure is None:
                    inner.step()
                else:
                    inner.step(self._again(closure, result))
            if self.masters is not None:
                self.masters.copy_to_model(self.param_name)
        self._after_step(self._found_inf)
        return result

    def _again(self, closure: Callable[[], Any], first: Any) -> Callable[[], Any]:
        """The closure the inner optimizer gets: its first call returns the loss already
        computed (and checked); later calls (L-BFGS) evaluate on the current weights."""
        calls = 0

        def again() -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                return first
            masters = self.masters
            if masters is not None:
                masters.copy_to_model(self.param_name)
                masters.zero_model_grads(set_to_none=True)
                for _, m in masters.pairs:
                    m.grad = None
            with torch.enable_grad():
                loss = closure()
            if masters is not None:
                masters.accumulate_grads()
            return loss

        return again

    def _after_step(self, found_inf: bool) -> None:
        self.steps += 1
        if not found_inf:
            self.skip_streak = 0
        if self._several is not None:  # the shared scale is updated once per round
            self._several.stepped_once(self, found_inf)
        elif self.scaler is not None:
            self.scaler.update(found_inf)
        self._backward_calls = 0
        self._unscaled = False
        self._found_inf = False
        self._wide = {}
        if self.monitor is not None:
            self.monitor.after_step(self, found_inf)

    @property
    def step_will_be_skipped(self) -> bool:
        """After unscaling: True if this step's gradients hold inf/NaN (it is skipped)."""
        return self._found_inf

    def _record_skip(self) -> None:
        self.skipped_steps += 1
        self.skip_streak += 1
        for p in self.step_parameters():
            if p.grad is not None and not grad_is_finite(p.grad):
                self.last_nonfinite_param = self._names.get(id(p), "?")
                break
        logger.debug("mixprec: skipped step %d: non-finite gradient in %s",
                     self.steps, self.last_nonfinite_param)
        if self.skip_streak == self.collapse_patience:
            scale = "" if self.scaler is None else (
                f" (the loss scale collapsed to {self.scaler.scale:g}; the first clean step "
                f"puts it back to {self.scaler.healthy_scale:g}, the last that trained cleanly)"
                if self.scaler.recover_after else
                f" (loss scale collapsed to {self.scaler.scale:g}: it recovers only by "
                f"growth every {self.scaler.growth_interval} clean steps)")
            warn_user(
                f"The last {self.skip_streak} optimizer steps were all skipped because of "
                f"inf/NaN gradients{scale}; the first non-finite gradient is in parameter "
                f"{self.last_nonfinite_param!r}. The model produces non-finite gradients at "
                "any scale: check the inputs and learning rate, or use a bf16 mode."
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        assert self.optimizer is not None
        self.optimizer.optimizer.zero_grad(set_to_none)
        if self.masters is not None:
            self.masters.zero_model_grads(set_to_none)
        self._backward_calls = 0
        self._unscaled = False

    def _any_grad(self) -> bool:
        if any(p.grad is not None for p in self.step_parameters()):
            return True
        return self.masters is not None and self.masters.model_has_grads()

    # -- names -----------------------------------------------------------------------

    def param_name(self, param: torch.Tensor) -> str:
        """The dotted name of the model parameter ``param`` is (or is the master of)."""
        return self._names.get(id(param), "?")
