"""``BitsandbytesOptimizer``: torch Adam/AdamW replaced by bitsandbytes' 8-bit Adam."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch

import mixprec
from mixprec.exceptions import ModeOptionError, UnsupportedDeviceError, WrapError
from mixprec.utils import check_number, match_module, normalize_patterns, warn_user

from ._deps import require_bitsandbytes

__all__ = ["BitsandbytesOptimizer"]

#: mode name -> (bitsandbytes class name, paged)
MODES = {
    "adam8bit": ("Adam8bit", False),
    "adamw8bit": ("AdamW8bit", False),
    "paged-adam8bit": ("PagedAdam8bit", True),
    "paged-adamw8bit": ("PagedAdamW8bit", True),
}


class BitsandbytesOptimizer(mixprec.OptimizerMode):
    """Replace the user's ``torch.optim.Adam``/``AdamW`` by bitsandbytes' 8-bit Adam.

    Same parameter groups (the group dicts themselves, so schedulers keep
    working), same learning rates, betas, eps and weight decay, with the weight-decay
    rule of the torch optimizer replaced: ``torch.optim.Adam`` adds
    ``weight_decay * p`` to the gradient (L2) before the 8-bit step, as torch does
    (bitsandbytes itself only decays decoupled), while ``AdamW`` (and ``Adam`` with
    ``decoupled_weight_decay=True``) decays the weights. Adam's state is
    kept in 8 bits (blockwise, 256 values per block) except for the parameters
    of ``optim_32bit_modules`` (every ``torch.nn.Embedding`` by default) and
    tensors smaller than ``min_8bit_size``, which keep 32-bit state.

    The 32-bit overrides are registered in a ``GlobalOptimManager`` of this
    optimizer's own, for exactly its parameters: bitsandbytes' process-wide
    instance matches overrides by parameter id and position, so entries left by
    an earlier model could select the wrong tensors. Overrides a module
    registered there itself (``register_module_override``, as
    ``bitsandbytes.nn.StableEmbedding`` does) are carried over.

    :param mode: ``"adam8bit"``, ``"adamw8bit"``, ``"paged-adam8bit"`` or
        ``"paged-adamw8bit"`` (paged: state in CUDA unified memory; CUDA only).
    :param optim_32bit_modules: module types, or dotted names/globs, whose
        parameters keep 32-bit Adam state. Default: ``(torch.nn.Embedding,)``.
    :param min_8bit_size: tensors with fewer elements keep 32-bit state (bitsandbytes'
        default 4096: for small tensors the block constants cost more than they save).
    """

    def __init__(
        self,
        mode: str = "adamw8bit",
        *,
        optim_32bit_modules: Iterable[type[torch.nn.Module] | str] = (torch.nn.Embedding,),
        min_8bit_size: int = 4096,
    ) -> None:
        if mode not in MODES:
            raise ModeOptionError(
                f"Unknown bitsandbytes optimizer mode {mode!r}; use one of {', '.join(MODES)}."
            )
        require_bitsandbytes(mode)
        self.name = mode
        self.class_name, self.paged = MODES[mode]
        entries = [optim_32bit_modules] if isinstance(optim_32bit_modules, (str, type)) \
            else list(optim_32bit_modules)
        self.module_types = tuple(e for e in entries if isinstance(e, type))
        bad = [e for e in entries if not isinstance(e, (str, type))
               or (isinstance(e, type) and not issubclass(e, torch.nn.Module))]
        if bad:
            raise ModeOptionError(
                f"optim_32bit_modules takes torch.nn.Module types or dotted module names; got "
                f"{bad[0]!r}."
            )
        self.module_names = normalize_patterns([e for e in entries if isinstance(e, str)],
                                               "optim_32bit_modules")
        self.min_8bit_size = check_number(min_8bit_size, "min_8bit_size", minimum=0, integer=True)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.module_types != (torch.nn.Embedding,) or self.module_names:
            opts["optim_32bit_modules"] = sorted(
                [f"{t.__module__}.{t.__qualname__}" for t in self.module_types]
                + list(self.module_names))
        if self.min_8bit_size != 4096:
            opts["min_8bit_size"] = self.min_8bit_size
        return opts

    def __repr__(self) -> str:
        return f"BitsandbytesOptimizer({self.name!r})"

    # -- validation --------------------------------------------------------------------------

    def validate(
        self, optimizer: torch.optim.Optimizer, module: torch.nn.Module, device: torch.device
    ) -> None:
        name = type(optimizer).__name__
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            what = ("a subclass of Adam, whose own step would be lost"
                    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
                    else "not an Adam optimizer")
            raise WrapError(
                f"Optimizer mode {self.name!r} replaces torch.optim.Adam or AdamW, but the "
                f"optimizer is {name} ({what}); build torch.optim.AdamW(...) or drop "
                f"'+{self.name}' from the mode."
            )
        if optimizer.state:
            raise WrapError(
                f"The {name} optimizer already has state (it has taken steps), which 8-bit "
                f"Adam cannot take over exactly; wrap before the first step, or wrap a fresh "
                "optimizer and load the checkpoint with opt.load_state_dict() afterwards."
            )
        for index, group in enumerate(optimizer.param_groups):
            where = f"param group {index}"
            for key, fix in (("amsgrad", "amsgrad=False"), ("maximize", "maximize=False"),
                             ("differentiable", "differentiable=False")):
                if group.get(key):
                    raise WrapError(
                        f"bitsandbytes 8-bit Adam does not support {key}=True ({where}); "
                        f"build the {name} with {fix}, or drop '+{self.name}' from the mode."
                    )
            if torch.is_tensor(group.get("lr")) or any(torch.is_tensor(b) for b in group["betas"]):
                raise WrapError(
                    f"bitsandbytes 8-bit Adam takes float hyper-parameters, but {where} has a "
                    "tensor lr or betas; pass Python floats."
                )
        names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.is_complex():
                    raise WrapError(
                        f"Parameter {names.get(id(p), '?')!r} is {p.dtype}, which bitsandbytes' "
                        "8-bit Adam would update as if it were real numbers (its Adam state "
                        f"would be wrong); drop '+{self.name}' (torch's Adam steps complex "
                        "parameters correctly), or store the parameter as real numbers "
                        "(torch.view_as_real)."
                    )
        if self.paged and device.type != "cuda":
            raise UnsupportedDeviceError(
                f"Optimizer mode {self.name!r} pages its state through CUDA unified memory "
                f"and needs a CUDA device, but the model is on {device.type!r}; use "
                f"'{self.name.removeprefix('paged-')}' instead.",
                device=device,
            )
        if device.type not in ("cpu", "cuda"):
            raise UnsupportedDeviceError(
                f"Optimizer mode {self.name!r} runs on the CPU or CUDA, not on {device.type!r}.",
                device=device,
            )

    # -- conversion --------------------------------------------------------------------------

    def _overridden_names(self, module: torch.nn.Module) -> dict[str, str]:
        """Dotted parameter name -> why it keeps 32-bit state."""
        out: dict[str, str] = {}
        for mod_name, sub in module.named_modules(remove_duplicate=False):
            reason = None
            if isinstance(sub, self.module_types):
                reason = type(sub).__name__
            elif pattern := match_module(mod_name, self.module_names):
                reason = repr(pattern)
            if reason is None:
                continue
            for p_name, _ in sub.named_parameters(prefix=mod_name, remove_duplicate=False):
                out.setdefault(p_name, reason)
        return out

    def convert_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        module: torch.nn.Module,
        param_names: Mapping[torch.Tensor, str],
    ) -> tuple[torch.optim.Optimizer, list[str]]:
        import bitsandbytes as bnb
        from bitsandbytes.optim import GlobalOptimManager

        d = optimizer.defaults
        defaults = {"lr": float(d["lr"]), "betas": tuple(float(b) for b in d["betas"]),
                    "eps": float(d["eps"]), "weight_decay": float(d["weight_decay"])}
        cls = getattr(bnb.optim, self.class_name)
        # The user's group dicts themselves: a scheduler built on them keeps working.
        new = cls(optimizer.param_groups, **defaults, min_8bit_size=self.min_8bit_size)

        # A GlobalOptimManager for this optimizer only (see the class docstring), filled
        # before every step by _StepConfig.
        manager = GlobalOptimManager.__new__(GlobalOptimManager)
        manager.initialize()
        new.mng = manager
        overridden = self._overridden_names(module)
        step_config = _StepConfig(new, module, param_names, overridden,
                                  decoupled=type(optimizer) is torch.optim.AdamW)
        step_config.refresh(new, warn=False)
        new.register_step_pre_hook(step_config.before_step)
        new.register_step_post_hook(step_config.after_step)
        chosen = [step_config.name(p) for g in new.param_groups for p in g["params"]
                  if manager.pid2config.get(id(p), {}).get("optim_bits") == 32]
        _steps_count_for(optimizer, new)

        params = [p for g in new.param_groups for p in g["params"]]
        small = [p for p in params if p.numel() < self.min_8bit_size]
        kinds = sorted({overridden[n] for n in chosen if n in overridden})
        lines = [
            f"optimizer: torch {type(optimizer).__name__} -> bitsandbytes {self.class_name} "
            f"({len(new.param_groups)} param groups, {len(params)} tensors, hyper-parameters kept)",
            f"optimizer: 32-bit state for {len(chosen)} tensors"
            + (f" ({', '.join(kinds)})" if kinds else "")
            + (f": {', '.join(chosen[:8])}{' …' if len(chosen) > 8 else ''}" if chosen else ""),
        ]
        if small:
            lines.append(f"optimizer: {len(small)} tensors under {self.min_8bit_size} elements "
                         "keep 32-bit state (min_8bit_size)")
        return new, lines


class _StepConfig:
    """What bitsandbytes reads for each tensor it steps (its ``pid2config``), worked out
    again before every step, so that what the user registers after ``wrap`` counts.

    Sources: the parameters of ``optim_32bit_modules`` (32-bit state), and bitsandbytes'
    process-wide ``GlobalOptimManager``: overrides registered there with
    ``register_module_override`` (Lightning's docs make them after the optimizer
    exists; ``StableEmbedding`` makes them when built). bitsandbytes itself reads those
    only at its first step and only for tensors it holds itself; here they also reach
    the fp32 masters of a module's parameters (matched through the parameter's name) and
    the step copies ``16-true`` gives the optimizer (matched by position). An
    ``optim_bits`` override that comes after a tensor's state exists cannot change that
    state: a ``MixprecWarning`` says so, once per tensor.

    Groups with L2 weight decay (those of a ``torch.optim.Adam`` without
    ``decoupled_weight_decay``) get ``weight_decay=0`` here, so bitsandbytes does not
    decay the weights, and for the step each gradient is replaced by
    ``grad + weight_decay * p``, exactly torch's Adam; the gradient tensors themselves
    are put back after the step, unchanged.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module,
                 param_names: Mapping[torch.Tensor, str], overridden: Mapping[str, str],
                 decoupled: bool) -> None:
        #: how a group without a ``decoupled_weight_decay`` key decays (the torch class's rule)
        self.decoupled = decoupled
        #: (tensor, L2 coefficient) for the next step, and the gradients lent out for it
        self.l2: list[tuple[torch.Tensor, float]] = []
        self.lent: list[tuple[torch.Tensor, torch.Tensor]] = []
        names_by_id = {id(p): n for p, n in param_names.items()}
        model_params = dict(module.named_parameters(remove_duplicate=False))
        #: per group, the tensors the optimizer held at wrap (the masters where there are):
        #: inside a step the lists may hold step copies instead
        self.held = [list(g["params"]) for g in optimizer.param_groups]
        self.names = {id(p): names_by_id.get(id(p), "?") for ps in self.held for p in ps}
        #: optimizer tensor id -> the model's parameter of the same name, where they differ
        self.model_param = {id(p): model_params[n] for ps in self.held for p in ps
                            if (n := self.names[id(p)]) in model_params
                            and model_params[n] is not p}
        self.wide = {id(p) for ps in self.held for p in ps if self.names[id(p)] in overridden}
        self.warned: set[int] = set()

    def name(self, p: torch.Tensor) -> str:
        return self.names.get(id(p), f"a tensor of shape {tuple(p.shape)}")

    def _held(self, group_index: int, index: int, p: torch.Tensor) -> torch.Tensor:
        """The tensor held at wrap in this place (``p`` unless ``p`` is a step copy)."""
        if group_index < len(self.held) and index < len(self.held[group_index]):
            held = self.held[group_index][index]
            if held is p or (held.shape == p.shape and id(p) not in self.names):
                return held
        return p

    def refresh(self, optimizer: torch.optim.Optimizer, warn: bool = True) -> None:
        from bitsandbytes.optim import GlobalOptimManager

        by_tensor: dict[int, dict[str, Any]] = {}
        for owner, attr, config in GlobalOptimManager.get_instance().module_weight_config_triple:
            tensor = getattr(owner, attr, None)
            if tensor is not None:
                by_tensor[id(tensor)] = config  # a later registration wins, as in bitsandbytes
        pid2config: dict[int, dict[str, Any]] = {}
        self.l2 = []
        for group_index, group in enumerate(optimizer.param_groups):
            l2 = not group.get("decoupled_weight_decay", self.decoupled)
            for index, p in enumerate(group["params"]):
                held = self._held(group_index, index, p)
                source = self.model_param.get(id(held))
                config = dict(by_tensor.get(id(held))
                              or (by_tensor.get(id(source), {}) if source is not None else {}))
                if id(held) in self.wide:
                    config["optim_bits"] = 32
                if l2:
                    coefficient = float(config.get("weight_decay", group["weight_decay"]))
                    if coefficient:
                        self.l2.append((p, coefficient))
                        config["weight_decay"] = 0.0  # decayed through the gradient instead
                if not config:
                    continue
                pid2config[id(p)] = config
                state = optimizer.state.get(p)
                if (warn and config.get("optim_bits") == 32 and state
                        and state["state1"].dtype is torch.uint8 and id(held) not in self.warned):
                    self.warned.add(id(held))
                    warn_user(
                        f"{self.name(held)} already has 8-bit Adam state, so the bitsandbytes "
                        "override {'optim_bits': 32} registered for it after its first step "
                        "does not change it; register overrides before the first opt.step() "
                        "(or wrap a fresh optimizer and load the checkpoint)."
                    )
        manager = optimizer.mng  # type: ignore[attr-defined]
        manager.pid2config = pid2config
        manager.uses_config_override = bool(pid2config)

    def before_step(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        """Step pre-hook: the configuration, then the L2 term in the gradients."""
        self.after_step(optimizer, (), {})  # a step that raised left gradients lent out
        self.refresh(optimizer)
        with torch.no_grad():
            for p, coefficient in self.l2:
                if p.grad is not None:
                    self.lent.append((p, p.grad))
                    p.grad = p.grad.add(p, alpha=coefficient)

    def after_step(self, _optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        """Step post-hook: the gradients as backward made them."""
        for p, grad in self.lent:
            p.grad = grad
        self.lent = []


def _steps_count_for(user: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Each step of ``new`` counts as a step of the user's optimizer it replaces.

    An LR scheduler built on the user's optimizer before ``wrap`` wraps that object's
    ``step`` to note that it ran (torch's ``_opt_called``) and otherwise warns
    "lr_scheduler.step() before optimizer.step()" in a correct loop. A weak reference:
    the user's optimizer is not kept alive for this.
    """
    ref = weakref.ref(user)

    def mark(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        target = ref()
        if target is not None:
            target._opt_called = True  # type: ignore[attr-defined]

    new.register_step_post_hook(mark)
