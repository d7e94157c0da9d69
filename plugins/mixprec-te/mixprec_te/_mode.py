"""``TransformerEngineMode``: FP8 training through NVIDIA Transformer Engine."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

import mixprec
from mixprec.exceptions import CheckpointError, ModeOptionError
from mixprec.utils import (
    ScalerConfig,
    build_context,
    cast_floating,
    check_bool,
    device_of,
    dtype_name,
    normalize_patterns,
    parse_dtype,
    thread_default_dtype,
    warn_user,
)

from ._convert import BUILT, convert_layers, kept_by_te, revert_layers, torch_layers_as_te
from ._hardware import check_hardware
from ._policy import LayerPlan, plan_layers
from ._recipe import build_recipe, describe_recipe, is_te_recipe, normalize_recipe
from ._te import (
    UNSAFE_PICKLE_ENV,
    extra_state_refusal,
    fp8_autocast,
    is_te_module,
    load_recipe_module,
    load_te,
    te_version,
)

__all__ = ["TransformerEngineMode"]

logger = logging.getLogger("mixprec.te")

_NAMES = {torch.bfloat16: "transformer-engine", torch.float16: "transformer-engine-float16"}


class TransformerEngineMode(mixprec.PrecisionMode):
    """Linear layers (and norms) as Transformer Engine layers, the forward in FP8.

    ``transformer-engine`` keeps the weights in bf16, ``transformer-engine-float16``
    in fp16 with dynamic loss scaling and fp32 master weights. GEMMs of converted
    ``Linear`` layers run in FP8 under TE's autocast with ``recipe``; other ops run
    under ``torch.autocast`` to ``fallback_dtype``.

    :param weights_dtype: ``"bf16"`` or ``"fp16"`` (or the torch dtype; any spelling
        :func:`mixprec.utils.parse_dtype` reads).
    :param recipe: the FP8 recipe: a TE recipe object (``DelayedScaling(...)``,
        ``Float8CurrentScaling(...)``), a dict such as ``{"fp8_format": "HYBRID",
        "amax_history_len": 16, "amax_compute_algo": "max"}`` (``"scaling":
        "current"`` for current scaling), or None for TE's ``DelayedScaling()``.
    :param replace_layers: replace ``nn.Linear``/``LayerNorm``/``RMSNorm`` with TE
        layers; False for models that already use TE layers where they should.
    :param fallback_dtype: autocast dtype for ops TE does not run in FP8 (default:
        ``weights_dtype``; ``"fp32"`` turns autocast off).
    :param ignore_modules: dotted module names or globs of modules to leave alone,
        matched by :func:`mixprec.utils.match_module` as in every mode: a name or glob
        selects the module and everything inside it (``"blocks.*.attn"`` keeps
        ``blocks.0.attn.q``; ``"lm_head"`` does not select ``lm_head2``), matched from
        the end of the dotted name too (``"lm_head"`` selects ``base_model.model.lm_head``).
    :param master_weights: keep fp32 master weights in the optimizer. Default: off
        for bf16 (as Lightning), on for fp16, where it is required (torch's Adam
        cannot step fp16 parameters: its ``eps`` rounds to 0).
    :param keep_output_dtype: return outputs in their compute dtype, not fp32.
    :param scaler_options: loss-scaler options (fp16 only), see :class:`mixprec.LossScaler`.
    """

    def __init__(
        self,
        weights_dtype: str | torch.dtype = "bf16",
        *,
        recipe: Mapping[str, Any] | Any | None = None,
        replace_layers: bool = True,
        fallback_dtype: str | torch.dtype | None = None,
        ignore_modules: str | Iterable[str] = (),
        master_weights: bool | None = None,
        keep_output_dtype: bool = False,
        **scaler_options: Any,
    ) -> None:
        self.weights_dtype = parse_dtype(weights_dtype, (torch.bfloat16, torch.float16),
                                         option="weights_dtype")
        self.name = _NAMES[self.weights_dtype]
        fp16 = self.weights_dtype is torch.float16
        self.fallback_dtype = (self.weights_dtype if fallback_dtype is None else parse_dtype(
            fallback_dtype, (torch.bfloat16, torch.float16, torch.float32), option="fallback_dtype"))
        if recipe is None or isinstance(recipe, Mapping):
            self.recipe_spec: dict[str, Any] | None = None if recipe is None else normalize_recipe(recipe)
            self._recipe: Any = None
        elif is_te_recipe(recipe):
            self.recipe_spec, self._recipe = None, recipe
        else:
            raise ModeOptionError(
                f"recipe must be a Transformer Engine recipe object or a dict, got "
                f"{type(recipe).__name__}; for example {{'fp8_format': 'HYBRID', "
                "'amax_history_len': 16, 'amax_compute_algo': 'max'}."
            )
        self.replace_layers = check_bool(replace_layers, "replace_layers")
        patterns = (ignore_modules,) if isinstance(ignore_modules, str) else tuple(ignore_modules)
        normalize_patterns(patterns, "ignore_modules")  # checks each entry
        # Kept in the order given (not normalize_patterns' sorted one): options() goes into
        # checkpoints, and those of mixprec-te 0.1 must still resume.
        self.ignore_modules = patterns
        if master_weights is not None:
            master_weights = check_bool(master_weights, "master_weights")
        if master_weights is False and fp16:
            raise ModeOptionError(
                f"{self.name} needs master_weights (fp32 copies for the optimizer): torch's "
                "optimizers cannot step fp16 weights (Adam's eps=1e-8 rounds to 0 in fp16); "
                "leave master_weights at its default or use 'transformer-engine' (bf16)."
            )
        self.master_weights = bool(fp16 if master_weights is None else master_weights)
        self._master_default = master_weights is None
        self.needs_scaling = fp16
        self.keep_output_dtype = check_bool(keep_output_dtype, "keep_output_dtype")
        unknown = sorted(set(scaler_options) - set(ScalerConfig.option_names()))
        if unknown:
            raise ModeOptionError(
                f"{self.name} does not take option(s) {', '.join(map(repr, unknown))}; "
                f"loss-scaler options are {', '.join(ScalerConfig.option_names())}."
            )
        if scaler_options and not fp16:
            raise ModeOptionError(
                f"Loss-scaler options ({', '.join(sorted(scaler_options))}) apply only to "
                "'transformer-engine-float16'; bf16 weights need no loss scaling."
            )
        self._scaler_options = dict(scaler_options)
        if fp16:
            mixprec.LossScaler(**scaler_options)  # validate now, before anything is wrapped
        self.device: torch.device | None = None
        self.plan: LayerPlan | None = None

    # -- description ----------------------------------------------------------

    @property
    def param_dtype(self) -> torch.dtype:
        return self.weights_dtype

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"recipe": self.recipe_options()}
        if not self.replace_layers:
            opts["replace_layers"] = False
        if self.fallback_dtype is not self.weights_dtype:
            opts["fallback_dtype"] = dtype_name(self.fallback_dtype)
        if self.ignore_modules:
            opts["ignore_modules"] = list(self.ignore_modules)
        if not self._master_default:
            opts["master_weights"] = self.master_weights
        if self.keep_output_dtype:
            opts["keep_output_dtype"] = True
        opts.update(self._scaler_options)
        return opts

    def recipe_options(self) -> dict[str, Any]:
        """The recipe as plain values (the dict given, or a recipe object's fields)."""
        if self._recipe is not None and self.recipe_spec is None:
            return describe_recipe(self._recipe)
        return dict(self.recipe_spec or {"scaling": "delayed"})

    @property
    def recipe(self) -> Any:
        """The Transformer Engine recipe object (built on first use; needs TE)."""
        if self._recipe is None:
            self._recipe = build_recipe(self.recipe_spec, load_recipe_module(self.name))
        return self._recipe

    # -- checks -----------------------------------------------------------------

    def validate(self, module: torch.nn.Module, device: torch.device) -> None:
        te = load_te(self.name)
        recipe = self.recipe
        self._check_hardware(te, device, recipe)

    def _check_hardware(self, te: Any, device: torch.device, recipe: Any) -> None:
        """The device checks (CUDA, compute capability >= 8.9, TE's verdict)."""
        check_hardware(te, device, self.name, recipe)

    def layer_plan(self, module: torch.nn.Module, te: Any = None) -> LayerPlan:
        """What wrapping would do to each layer of ``module`` (changes nothing).

        :param te: ``transformer_engine.pytorch`` if available (it decides whether
            ``RMSNorm`` converts); without it TE's ``RMSNorm`` is assumed present.
        """
        return plan_layers(
            module, ignore_modules=self.ignore_modules,
            te_has_rmsnorm=te is None or hasattr(te, "RMSNorm"), built_by_mixprec=BUILT,
        )

    # -- conversion ---------------------------------------------------------------

    def convert_module(self, module: torch.nn.Module) -> list[str]:
        te = load_te(self.name)
        self.device = device_of(module)
        plan = self.plan = self.layer_plan(module, te)
        lines: list[str] = []
        with self._on_device():
            reverted = revert_layers(module, plan.revert)
            prebuilt = sum(1 for m in module.modules() if is_te_module(m) and m in BUILT)
            replaced = []
            if self.replace_layers and not plan.foreign_te:
                replaced = convert_layers(te, module, plan, self.weights_dtype, self.device)
        n_params, n_buffers = cast_floating(module, self.weights_dtype, skip=kept_by_te(module))
        lines += self._summary(plan, replaced, reverted, prebuilt, n_params, n_buffers)
        if plan.unmatched_ignores:
            warn_user(
                f"ignore_modules entries {plan.unmatched_ignores} match no module of the model; "
                "check the names against model.named_modules()."
            )
        kept = plan.shape_kept if self.replace_layers and not plan.foreign_te else []
        if kept:
            names = ", ".join(f"{d.name} ({d.reason.split(':')[0]})" for d in kept)
            warn_user(
                f"{len(kept)} Linear layer(s) stay in {dtype_name(self.weights_dtype)} because "
                f"FP8 GEMMs need in/out features divisible by 16: {names}. Pad them to "
                "multiples of 16, or list them in ignore_modules to keep them on purpose."
            )
        return lines

    def _summary(self, plan: LayerPlan, replaced: list[str], reverted: list[str], prebuilt: int,
                 n_params: int, n_buffers: int) -> list[str]:
        lines = []
        if plan.foreign_te:
            shown = ", ".join(plan.foreign_te[:4]) + (" …" if len(plan.foreign_te) > 4 else "")
            lines.append(f"model already holds Transformer Engine layers ({shown}): no layer replaced")
        elif not self.replace_layers:
            lines.append("replace_layers=False: no layer replaced")
        else:
            by_kind: dict[str, int] = {}
            for d in plan.to_convert:
                by_kind[d.kind] = by_kind.get(d.kind, 0) + 1
            counts = ", ".join(f"{n} nn.{k} -> te.{k}" for k, n in by_kind.items()) or "none"
            lines.append(f"layers replaced: {counts}")
            if prebuilt:
                lines.append(f"already Transformer Engine layers (built by init_module): {prebuilt}")
            kept = plan.shape_kept
            if kept:
                lines.append("kept, shapes FP8 GEMMs cannot take (in/out features must be "
                             "multiples of 16): " + ", ".join(
                                 f"{d.name} ({d.reason.split(':')[0]})" for d in kept))
            grouped: dict[tuple[str, str], list[str]] = {}
            for d in plan.decisions:
                if not d.convert and not d.shape_kept:
                    grouped.setdefault((d.kind, d.reason), []).append(d.name)
            for (kind, reason), names in grouped.items():
                lines.append(f"kept (nn.{kind}; {reason}): {', '.join(names)}")
        if reverted:
            lines.append(f"back to torch layers (ignore_modules): {', '.join(reverted)}")
        lines.append(f"cast {n_params} parameters and {n_buffers} buffers to "
                     f"{dtype_name(self.weights_dtype)}")
        autocast = ("no torch.autocast" if self.fallback_dtype is torch.float32 else
                    f"torch.autocast({self.device.type!r}, {dtype_name(self.fallback_dtype)})"
                    if self.device is not None else "")
        lines.append(f"forward: TE FP8 autocast ({type(self.recipe).__name__}) inside {autocast} "
                     f"on {self.device}")
        return lines

    def init_context(self, device: torch.device | str | None = None) -> contextlib.AbstractContextManager[None]:
        te = load_te(self.name)
        target = torch.device("cuda") if device is None else torch.device(device)
        if target.type == "cuda" and target.index is None and torch.cuda.is_available():
            target = torch.device("cuda", torch.cuda.current_device())
        if target.type != "meta":
            self._check_hardware(te, target, self.recipe)
        return self._init(te, target)

    @contextlib.contextmanager
    def _init(self, te: Any, target: torch.device) -> Iterator[None]:
        with build_context(self.weights_dtype, target):
            if self.replace_layers:
                with torch_layers_as_te(te, target):
                    yield
            else:
                yield

    def unwrap_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Turn the TE layers mixprec built back into torch layers (same values)."""
        names = [n for n, m in module.named_modules() if is_te_module(m) and m in BUILT]
        revert_layers(module, names)
        return module

    # -- forward --------------------------------------------------------------------

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        if self.device is not None and self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        te = load_te(self.name)
        device_type = self.device.type if self.device is not None else "cuda"
        with contextlib.ExitStack() as stack:
            # per thread: a forward never changes the process-wide default dtype
            stack.enter_context(thread_default_dtype(self.weights_dtype))
            stack.enter_context(self._on_device())
            if self.fallback_dtype is not torch.float32:
                stack.enter_context(torch.autocast(device_type, dtype=self.fallback_dtype))
            stack.enter_context(fp8_autocast(te, self.recipe))
            yield

    def convert_input(self, data: Any) -> Any:
        return mixprec.apply_to_float_tensors(data, lambda t: t.to(self.weights_dtype))

    def convert_output(self, data: Any) -> Any:
        if self.keep_output_dtype:
            return data
        return mixprec.apply_to_float_tensors(data, lambda t: t.to(torch.float32))

    # -- backward ---------------------------------------------------------------------

    def create_scaler(self) -> mixprec.LossScaler | None:
        return mixprec.LossScaler(**self._scaler_options) if self.needs_scaling else None

    # -- checkpoints --------------------------------------------------------------------

    def load_module_state_dict(
        self, module: torch.nn.Module, state: Mapping[str, Any], strict: bool
    ) -> Any:
        """Load weights; a checkpoint of the plain model (no TE FP8 state) loads too.

        TE layers keep their FP8 state (amax history, scales) under ``_extra_state``;
        when a checkpoint lacks it (it was saved before conversion) the layers start
        fresh, as they did at conversion. Key mismatches, and FP8 state the installed
        TE refuses to unpickle, are reported before anything is loaded.
        """
        expected = module.state_dict(keep_vars=True)
        extra = {f"{n}._extra_state" if n else "_extra_state"
                 for n, m in module.named_modules() if is_te_module(m)}
        missing = [k for k in expected if k not in state and k not in extra]
        unexpected = [k for k in state if k not in expected]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:6]}{' …' if len(missing) > 6 else ''}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected[:6]}{' …' if len(unexpected) > 6 else ''}")
            raise CheckpointError(
                f"The checkpoint does not fit this {self.name} model ({'; '.join(parts)}); "
                "wrap the same architecture with the same ignore_modules, or load with "
                "strict=False."
            )
        refused = [key for key in sorted(extra)
                   if key in state and extra_state_refusal(state[key], key) is not None]
        if refused:
            key = refused[0]
            raise CheckpointError(
                f"Transformer Engine {te_version()} refuses to load the FP8 delayed-scaling state "
                f"(amax history and scales) of {len(refused)} layer(s), first {key!r}: TE stores "
                "it as a pickle, which could run code, and unpickles it only with "
                f"{UNSAFE_PICKLE_ENV}=1. If the checkpoint is your own, set that variable; or "
                "drop the '._extra_state' entries from the state dict to restart the FP8 scales "
                "as after conversion; or train with a stateless recipe ({'scaling': 'current'})."
            )
        result = module.load_state_dict(state, strict=False)
        return type(result)([k for k in result.missing_keys if k not in extra],
                            result.unexpected_keys)
