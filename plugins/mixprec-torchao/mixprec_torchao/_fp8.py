"""FP8 training through torchao's ``Float8Linear``: ``fp8-tensorwise``, ``fp8-rowwise``,
``fp8-rowwise-gw-hp``.

Eligible ``nn.Linear`` layers are swapped for torchao's ``Float8Linear`` (dynamic
scaling, e4m3 forward, e5m2 or e4m3 gradients depending on the recipe); the rest
of the forward runs under bf16 autocast and the weights stay fp32 (or bf16 with
``param_dtype="bf16"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch

import mixprec
from mixprec.exceptions import ModeOptionError, UnsupportedDeviceError, WrapError
from mixprec.utils import (
    cast_floating,
    check_bool,
    device_of,
    normalize_patterns,
    parse_dtype,
    warn_user,
)

from ._deps import import_torchao
from ._select import ROOT, Fp8Plan, ModuleFilter, display_name, plan_fp8_layers, unmatched_patterns

__all__ = ["RECIPES", "Float8Training"]

#: mode name -> torchao recipe name
RECIPES: dict[str, str] = {
    "fp8-tensorwise": "tensorwise",
    "fp8-rowwise": "rowwise",
    "fp8-rowwise-gw-hp": "rowwise_with_gw_hp",
}
_RECIPE_WORDS = {
    "tensorwise": "one scale per tensor; e4m3 forward, e5m2 gradients",
    "rowwise": "one scale per row; e4m3 throughout, power-of-2 scales",
    "rowwise_with_gw_hp": "rowwise e4m3, grad-weight GEMM kept in high precision",
}
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
#: FP8 ``torch._scaled_mm`` needs compute capability 8.9 (Ada) or newer on CUDA.
_MIN_CAPABILITY = (8, 9)


def _autocast_option(value: Any) -> torch.dtype | None:
    """The ``autocast`` option: None (or ``"none"``) for no autocast, else bf16 in any
    spelling :func:`mixprec.utils.parse_dtype` reads."""
    if value is None or value == "none":
        return None
    try:
        return parse_dtype(value, (torch.bfloat16,), option="autocast")
    except ModeOptionError:
        raise ModeOptionError(
            f"Unsupported autocast {value!r}; use one of 'bf16', 'none'."
        ) from None


class Float8Training(mixprec.PrecisionMode):
    """FP8 ``nn.Linear`` layers (torchao ``convert_to_float8_training``), the rest of the
    forward under bf16 autocast, fp32 weights.

    :param recipe: ``"tensorwise"``, ``"rowwise"`` or ``"rowwise_with_gw_hp"`` (or the
        mode names ``"fp8-tensorwise"``, ``"fp8-rowwise"``, ``"fp8-rowwise-gw-hp"``).
    :param ignore_modules: modules whose ``nn.Linear`` layers stay in high precision, by
        full dotted path as ``named_modules()`` shows it (``"lm_head"``,
        ``"blocks.0.attn"``) or ``fnmatch`` glob (``"blocks.*.mlp.down"``), matched by
        :func:`mixprec.utils.match_module` as in every mode: a name or glob that selects
        a parent keeps every Linear inside it; names are matched from the end too
        (``"lm_head"`` selects ``base_model.model.lm_head``). A name that matches no
        module is an error.
    :param module_filter: ``fn(linear, fqn) -> bool``; False keeps the layer (torchao's
        ``module_filter_fn``). Called once per ``nn.Linear`` at ``wrap``.
    :param autocast: ``"bf16"`` (default): everything outside the FP8 GEMMs runs under
        ``torch.autocast(dtype=torch.bfloat16)``; ``None`` (or ``"none"``): it runs in
        ``param_dtype``.
    :param param_dtype: ``"32"`` (default) or ``"bf16"`` (or the torch dtype; any
        spelling :func:`mixprec.utils.parse_dtype` reads): the dtype parameters and
        buffers are stored in.
    :param master_weights: with ``param_dtype="bf16"``, keep fp32 master copies in the
        optimizer (as ``bf16-true`` with ``master_weights=True``).
    :param emulate: run the FP8 GEMMs emulated in high precision (torchao's
        ``emulate``): same rounding of the operands, no FP8 hardware or
        ``torch._scaled_mm`` needed (numerics checks on any device).
    :param pad_inner_dim: pad GEMM inner dimensions to multiples of 16 (torchao's
        ``pad_inner_dim``); layers must still have both dims divisible by 16 to be
        converted here.
    :param keep_output_dtype: return outputs as the forward produced them instead of fp32.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        recipe: str = "tensorwise",
        *,
        ignore_modules: str | Iterable[str] = (),
        module_filter: ModuleFilter | None = None,
        autocast: str | torch.dtype | None = "bf16",
        param_dtype: str | torch.dtype = "32",
        master_weights: bool = False,
        emulate: bool = False,
        pad_inner_dim: bool = False,
        keep_output_dtype: bool = False,
    ) -> None:
        recipe = RECIPES.get(recipe, recipe)
        if recipe not in _RECIPE_WORDS:
            raise ModeOptionError(
                f"Unknown FP8 recipe {recipe!r}; use one of {', '.join(_RECIPE_WORDS)}."
            )
        self.recipe = recipe
        self.name = next(k for k, v in RECIPES.items() if v == recipe)
        self.ignore_modules = normalize_patterns(ignore_modules, "ignore_modules")
        if module_filter is not None and not callable(module_filter):
            raise ModeOptionError(
                f"module_filter must be a function (module, fqn) -> bool, got "
                f"{type(module_filter).__name__}."
            )
        self.module_filter = module_filter
        self.autocast_dtype = _autocast_option(autocast)
        self._param_dtype = parse_dtype(param_dtype, (torch.float32, torch.bfloat16),
                                        option="param_dtype")
        master_weights = check_bool(master_weights, "master_weights")
        if master_weights and self._param_dtype is torch.float32:
            raise ModeOptionError(
                "master_weights=True needs param_dtype='bf16'; with fp32 parameters the "
                "optimizer already steps full-precision weights."
            )
        self.master_weights = master_weights
        self.emulate = check_bool(emulate, "emulate")
        self.pad_inner_dim = check_bool(pad_inner_dim, "pad_inner_dim")
        self.keep_output_dtype = check_bool(keep_output_dtype, "keep_output_dtype")

        float8 = import_torchao("float8", mode=self.name)
        config = float8.Float8LinearConfig.from_recipe_name(recipe)
        if self.emulate or self.pad_inner_dim:
            config = dataclasses.replace(config, emulate=self.emulate,
                                         pad_inner_dim=self.pad_inner_dim)
        self.config = config
        self._convert_fn: Callable[..., torch.nn.Module] = float8.convert_to_float8_training
        self.device_type = "cpu"
        self._plan: Fp8Plan | None = None
        self._converted: dict[str, torch.nn.Module] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._root_attrs: list[str] = []

    # -- description ------------------------------------------------------------

    @property
    def param_dtype(self) -> torch.dtype:
        return self._param_dtype

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.ignore_modules:
            opts["ignore_modules"] = list(self.ignore_modules)
        if self.module_filter is not None:
            opts["module_filter"] = getattr(self.module_filter, "__qualname__",
                                            type(self.module_filter).__name__)
        if self.autocast_dtype is None:
            opts["autocast"] = None
        if self._param_dtype is not torch.float32:
            opts["param_dtype"] = "bf16"
        for flag in ("master_weights", "emulate", "pad_inner_dim", "keep_output_dtype"):
            if getattr(self, flag):
                opts[flag] = True
        return opts

    # -- before anything changes -----------------------------------------------------

    def validate(self, module: torch.nn.Module, device: torch.device) -> None:
        """Check the device and plan every layer; raise before anything changes."""
        self._check_device(device)
        for fqn, sub in module.named_modules():
            if type(sub).__module__.startswith("torchao.float8"):
                raise WrapError(
                    f"Module {display_name(fqn)!r} is already a torchao {type(sub).__name__}; "
                    f"pass the model before convert_to_float8_training and let {self.name!r} "
                    "convert it."
                )
        missing = unmatched_patterns(module, self.ignore_modules)
        if missing:
            pattern, close = missing[0]
            hint = f" Did you mean {close!r}?" if close else ""
            raise ModeOptionError(
                f"ignore_modules entry {pattern!r} names no module of the model.{hint} "
                "Give a full dotted path or a glob as model.named_modules() shows the names."
            )
        plan = plan_fp8_layers(module, ignore_modules=self.ignore_modules,
                               module_filter=self.module_filter)
        if not plan.convert:
            kept = "; ".join(f"{display_name(n)}: {why}" for n, why in plan.kept) or "none found"
            raise WrapError(
                f"Mode {self.name!r} found no nn.Linear layer it can run in FP8 ({kept}); "
                "FP8 needs plain nn.Linear layers with both dimensions divisible by 16, so "
                "use 'bf16-mixed' for this model or change its layer sizes."
            )
        self._plan = plan

    def _check_device(self, device: torch.device) -> None:
        if self.autocast_dtype is not None and not torch.amp.is_autocast_available(device.type):
            raise UnsupportedDeviceError(
                f"{self.name} runs the non-FP8 part of the forward under torch.autocast, which "
                f"torch {torch.__version__} does not offer on {device.type!r}; pass "
                "autocast=None.", device=device,
            )
        if self.emulate or device.type == "cpu":
            return
        if device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < _MIN_CAPABILITY:
                raise UnsupportedDeviceError(
                    f"{self.name} needs a GPU with FP8 tensor cores (compute capability 8.9+: "
                    f"Ada, Hopper or newer), but {torch.cuda.get_device_name(device)} has "
                    f"{capability[0]}.{capability[1]}; use 'bf16-mixed', or emulate=True to "
                    "check FP8 numerics without the speed.", device=device,
                )
            return
        raise UnsupportedDeviceError(
            f"{self.name} runs on CUDA GPUs with FP8 support and (slowly) on the CPU, not on "
            f"{device.type!r}; move the model to 'cuda' or 'cpu', or pass emulate=True.",
            device=device,
        )

    # -- conversion ----------------------------------------------------------------

    def convert_module(self, module: torch.nn.Module) -> list[str]:
        plan = self._plan
        device = device_of(module)
        if plan is None:  # convert_module without validate: plan now (it may raise)
            self.validate(module, device)
            plan = self._plan
        assert plan is not None
        self.device_type = device.type

        lines = [f"fp8 recipe {self.recipe} (torchao Float8Linear, {_RECIPE_WORDS[self.recipe]}"
                 f"{', emulated GEMMs' if self.emulate else ''})"]
        if self._param_dtype is not torch.float32:
            n_params, n_buffers = cast_floating(module, self._param_dtype)
            lines.append(f"cast {n_params} parameters and {n_buffers} buffers to "
                         f"{self._param_dtype}")

        originals = {fqn: module.get_submodule(fqn) for fqn in plan.convert}
        wanted = set(plan.convert)
        converted = self._convert_fn(
            module, config=self.config, module_filter_fn=lambda _m, fqn: fqn in wanted,
        )
        if converted is not module:  # the root itself is an nn.Linear
            self._root_attrs = _become(module, converted)
        for fqn, old in originals.items():
            new = module.get_submodule(fqn)
            if new is not old:
                _carry_module_state(old, new)
            self._hooks.append(new.register_forward_pre_hook(_autocast_input))
            self._converted[fqn] = new

        shown = ", ".join(display_name(n) for n in plan.convert)
        lines.append(f"{len(plan.convert)} nn.Linear layers to FP8: {shown}")
        if plan.kept:
            lines += [f"kept in high precision: {display_name(n)} ({why})" for n, why in plan.kept]
            warn_user(
                f"{self.name}: {len(plan.kept)} nn.Linear layer(s) stay in high precision: "
                + "; ".join(f"{display_name(n)} ({why})" for n, why in plan.kept)
                + ". Pass ignore_modules / module_filter to choose layers explicitly."
            )
        if self.autocast_dtype is not None:
            lines.append(f"rest of the forward under torch.autocast({self.device_type!r}, "
                         f"{self.autocast_dtype}); parameters {self._param_dtype}")
        else:
            lines.append(f"rest of the forward in {self._param_dtype} (no autocast)")
        if self.device_type == "cpu" and not self.emulate:
            lines.append("CPU: FP8 GEMMs run torch._scaled_mm's reference kernel (slow; the "
                         "FP8 speed-up is a GPU property)")
        self._plan = None
        return lines

    def init_context(
        self, device: torch.device | str | None = None
    ) -> contextlib.AbstractContextManager[None]:
        return mixprec.build_context(self._param_dtype, device)

    def unwrap_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Put plain ``nn.Linear`` layers (same parameter objects) back for export."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for fqn, f8 in self._converted.items():
            if fqn == ROOT:
                module.__class__ = torch.nn.Linear
                for attr in self._root_attrs:
                    module.__dict__.pop(attr, None)
                continue
            linear = _plain_linear(f8)
            parent_name, _, child = fqn.rpartition(".")
            setattr(module.get_submodule(parent_name), child, linear)
        self._converted.clear()
        return module

    # -- forward ---------------------------------------------------------------------

    def fsdp_plan(self) -> Any:
        """FSDP2: convert the Linear layers before sharding, all-gather in fp32 and keep
        this mode's autocast around the sharded forward (torchao's FP8 all-gather is not
        used: it would put a tensor subclass into the state dict)."""
        from mixprec.distributed import FSDPPlan

        return FSDPPlan(convert_module=True, forward_context=True)

    def forward_context(self) -> contextlib.AbstractContextManager[None]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def convert_input(self, data: Any) -> Any:
        if self._param_dtype is torch.float32:
            return data
        return mixprec.apply_to_float_tensors(data, lambda t: t.to(self._param_dtype))

    def convert_output(self, data: Any) -> Any:
        if self.keep_output_dtype:
            return data
        return mixprec.apply_to_float_tensors(data, lambda t: t.to(torch.float32))


def _autocast_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: give ``Float8Linear`` its input in the autocast dtype off CUDA.

    ``Float8Linear.forward`` casts its input to the autocast dtype only for CUDA
    autocast (``torch.is_autocast_enabled()`` with no device means CUDA). Under CPU
    autocast an fp32 input therefore reached the GEMMs as fp32 while the incoming
    gradient was bf16, and the high-precision grad-weight GEMM of
    ``rowwise_with_gw_hp`` failed in backward with "expected m1 and m2 to have the
    same dtype" (torchao 0.18, torch 2.13). Casting here, as CUDA autocast would,
    makes every recipe train on the CPU.
    """
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    device = x.device.type
    if device == "cuda" or not x.is_floating_point() or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    if x.dtype is dtype:
        return None
    return (x.to(dtype), *args[1:])


def _carry_module_state(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """Give the swapped-in layer the old one's train/eval flag and the user's hooks."""
    new.train(old.training)
    for key in _HOOK_DICTS:
        if hasattr(old, key) and hasattr(new, key):
            getattr(new, key).update(getattr(old, key))


def _become(module: torch.nn.Module, converted: torch.nn.Module) -> list[str]:
    """Turn the root ``nn.Linear`` into the ``Float8Linear`` torchao built for it, in place
    (``wrap`` changes the user's module object; the parameters are already shared)."""
    added = [k for k in vars(converted) if k not in module.__dict__]
    for key in added:
        module.__dict__[key] = converted.__dict__[key]
    module.__class__ = type(converted)
    return added


def _plain_linear(layer: Any) -> torch.nn.Linear:
    with torch.device("meta"):
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
    linear.weight = layer.weight
    linear.bias = layer.bias
    _carry_module_state(layer, linear)
    return linear
