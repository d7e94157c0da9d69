"""A stand-in for the parts of ``transformer_engine`` that mixprec-te uses.

Transformer Engine cannot be installed without CUDA, so the CPU tests inject
these modules into ``sys.modules`` (fixture ``te`` in conftest.py). This is the
only library stand-in in the project. It copies TE's API surface as of TE 2.x
(``transformer_engine.pytorch`` and ``transformer_engine.common.recipe``):
class and module names, constructor signatures, parameter registration
(``bias=False`` leaves an empty, unregistered ``bias`` tensor, as in TE),
``_extra_state`` as a pickled ``uint8`` tensor holding scales and amax history,
TE's shape assertion for FP8 GEMMs, the delayed-scaling scale update, and the
FP8 autocast state. ``legacy=True`` gives the TE 1.x surface instead
(``fp8_autocast(fp8_recipe=)``, ``fp8.check_fp8_support()``, no
``Float8CurrentScaling``, no ``RMSNorm``, delayed-scaling pickles load without
the opt-in that recent TE asks for).

What it does not copy: the kernels. GEMMs and norms compute in the parameter /
autocast dtype with torch ops (no FP8 rounding), and layers accept CPU devices
(TE's accept CUDA and ``meta`` only).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import pickle
import sys
import types
import warnings
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

VERSION = "2.20.0+standin"


# -- transformer_engine.common.recipe ------------------------------------------------


class _FormatHelper(NamedTuple):
    max_fwd: float
    max_bwd: float


class Format(enum.Enum):
    E2M1 = _FormatHelper(max_fwd=6, max_bwd=6)
    E4M3 = _FormatHelper(max_fwd=448, max_bwd=448)
    E5M2 = _FormatHelper(max_fwd=57344, max_bwd=57344)
    HYBRID = _FormatHelper(max_fwd=448, max_bwd=57344)


class Recipe:
    """Base recipe class."""


@dataclasses.dataclass
class DelayedScaling(Recipe):
    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: Any = "max"
    scaling_factor_compute_algo: Any = None
    reduce_amax: bool = True
    fp8_dpa: bool = False
    fp8_mha: bool = False

    def __post_init__(self) -> None:
        assert self.fp8_format != Format.E5M2, "Pure E5M2 training is not supported."


@dataclasses.dataclass
class LegacyDelayedScaling(Recipe):
    """DelayedScaling as TE 1.x has it (``interval``, ``override_linear_precision``, no
    ``fp8_dpa``/``fp8_mha``); installed as ``DelayedScaling`` by ``build(legacy=True)``."""

    margin: int = 0
    interval: int = 1
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: Any = "max"
    override_linear_precision: tuple[bool, bool, bool] = (False, False, False)
    scaling_factor_compute_algo: Any = None
    reduce_amax: bool = True

    def __post_init__(self) -> None:
        assert self.fp8_format != Format.E5M2, "Pure E5M2 training is not supported."


LegacyDelayedScaling.__name__ = LegacyDelayedScaling.__qualname__ = "DelayedScaling"


@dataclasses.dataclass
class Float8CurrentScaling(Recipe):
    fp8_format: Format = Format.HYBRID
    fp8_dpa: bool = False
    fp8_mha: bool = False

    def __post_init__(self) -> None:
        assert self.fp8_format != Format.E5M2, "Pure E5M2 training is not supported."


@dataclasses.dataclass
class MXFP8BlockScaling(Recipe):
    margin: int = 0
    fp8_format: Format = Format.E4M3


# -- FP8 state and autocast ------------------------------------------------------------


class FP8GlobalStateManager:
    """Process-wide FP8 autocast state, as TE keeps it."""

    FP8_ENABLED = False
    FP8_RECIPE: Any = None
    SUPPORT: tuple[bool, str] = (True, "")
    MXFP8_SUPPORT: tuple[bool, str] = (False, "Device compute capability 10.0 or higher required for MXFP8 execution.")
    ENTERED: ClassVar[list[Any]] = []  # recipes of every autocast entered (for tests)

    @classmethod
    def is_fp8_enabled(cls) -> bool:
        return cls.FP8_ENABLED

    @classmethod
    def get_fp8_recipe(cls) -> Any:
        return cls.FP8_RECIPE


def check_fp8_support() -> tuple[bool, str]:
    return FP8GlobalStateManager.SUPPORT


def is_fp8_available(return_reason: bool = False) -> Any:
    return check_fp8_support() if return_reason else check_fp8_support()[0]


def is_mxfp8_available(return_reason: bool = False) -> Any:
    support = FP8GlobalStateManager.MXFP8_SUPPORT
    return support if return_reason else support[0]


class autocast:
    """TE >= 2.8: ``autocast(enabled, calibrating, recipe, amax_reduction_group, _graph)``."""

    def __init__(self, enabled: bool = True, calibrating: bool = False, recipe: Any = None,
                 amax_reduction_group: Any = None, _graph: bool = False) -> None:
        self._enabled = enabled
        self._recipe = recipe
        self._saved: tuple[bool, Any] | None = None

    def __enter__(self) -> autocast:
        if self._saved is not None:
            raise RuntimeError("autocast context manager cannot be entered more than once concurrently")
        recipe = DelayedScaling() if self._recipe is None else self._recipe
        if self._enabled:
            ok, reason = check_fp8_support()
            if not ok:
                raise RuntimeError(reason)
        self._saved = (FP8GlobalStateManager.FP8_ENABLED, FP8GlobalStateManager.FP8_RECIPE)
        FP8GlobalStateManager.FP8_ENABLED = self._enabled
        FP8GlobalStateManager.FP8_RECIPE = recipe
        FP8GlobalStateManager.ENTERED.append(recipe)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._saved is not None
        FP8GlobalStateManager.FP8_ENABLED, FP8GlobalStateManager.FP8_RECIPE = self._saved
        self._saved = None


def fp8_autocast(enabled: bool = True, calibrating: bool = False, fp8_recipe: Any = None,
                 fp8_group: Any = None, _graph: bool = False) -> autocast:
    """Deprecated in TE >= 2.8 (warns), the only spelling before."""
    warnings.warn(
        "fp8_autocast is deprecated and will be removed in a future release. "
        "Use autocast(enabled=..., calibrating=..., recipe=..., group=..., _graph=...) instead.",
        category=DeprecationWarning, stacklevel=2,
    )
    return autocast(enabled=enabled, calibrating=calibrating, recipe=fp8_recipe,
                    amax_reduction_group=fp8_group, _graph=_graph)


def legacy_fp8_autocast(enabled: bool = True, calibrating: bool = False, fp8_recipe: Any = None,
                        fp8_group: Any = None, _graph: bool = False) -> autocast:
    return autocast(enabled=enabled, calibrating=calibrating, recipe=fp8_recipe)


# -- transformer_engine.pytorch._extra_state (recent TE) ------------------------------------

UNSAFE_PICKLE_EXTRA_STATE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"
REFUSE_PICKLES = True  # recent TE; build(legacy=True) turns it off


def should_load_extra_state_pickle(data: bytes, context: str) -> bool:
    """TE's gate: delayed-scaling pickles load only with the opt-in set."""
    if not data:
        return False
    if os.getenv(UNSAFE_PICKLE_EXTRA_STATE_ENV, "0") == "1":
        return True
    raise RuntimeError(
        f"Refusing to load pickled Transformer Engine extra state for {context}. "
        "Delayed-scaling FP8 metadata can be stored as a Python pickle, and loading it "
        "can execute arbitrary code. Only enable unsafe loading if this checkpoint is from "
        f"a trusted source. To load it anyway, set {UNSAFE_PICKLE_EXTRA_STATE_ENV}=1."
    )


# -- modules ---------------------------------------------------------------------------------


def assert_dim_for_fp8_exec(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        assert math.prod(tensor.shape[:-1]) % 8 == 0 and tensor.shape[-1] % 16 == 0, (
            "FP8 execution requires the product of all dimensions except the last to be divisible"
            " by 8 and the last dimension to be divisible by 16, but got tensor with"
            f" dims={list(tensor.size())}"
        )


def _empty_state() -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


class TransformerEngineBaseModule(torch.nn.Module):
    """FP8 metadata kept by every TE module: scales and amax history per GEMM tensor."""

    NUM_FWD = 3  # input, weight, output

    def __init__(self) -> None:
        super().__init__()
        self.fp8 = False
        self.fp8_meta: dict[str, Any] = {"fp8_checkpoint": False}

    def _fp8_prepare(self) -> bool:
        self.fp8 = FP8GlobalStateManager.is_fp8_enabled()
        if not self.fp8:
            return False
        recipe = FP8GlobalStateManager.get_fp8_recipe()
        self.fp8_meta["fp8_checkpoint"] = True
        if not isinstance(recipe, (DelayedScaling, LegacyDelayedScaling)):
            return True
        history = self.fp8_meta.get("amax_history_fwd")
        if history is None or history.shape[0] != recipe.amax_history_len:
            self.fp8_meta["scale_fwd"] = torch.ones(self.NUM_FWD)
            self.fp8_meta["amax_history_fwd"] = torch.zeros(recipe.amax_history_len, self.NUM_FWD)
            return True
        # delayed scaling: scale from the amax history, then roll the history
        amax = history.max(dim=0).values if recipe.amax_compute_algo == "max" else history[0].clone()
        fp8_max = recipe.fp8_format.value.max_fwd
        scale = self.fp8_meta["scale_fwd"]
        new = (fp8_max / amax) / (2 ** recipe.margin)
        self.fp8_meta["scale_fwd"] = torch.where(amax > 0, new, scale)
        rolled = torch.roll(history, -1, 0)
        rolled[0].zero_()
        self.fp8_meta["amax_history_fwd"] = rolled
        return True

    def _record_amax(self, index: int, tensor: torch.Tensor) -> None:
        history = self.fp8_meta.get("amax_history_fwd")
        if history is not None:
            history[0, index] = tensor.detach().abs().max().float().cpu()

    def get_extra_state(self) -> torch.Tensor:
        if not (self.fp8_meta["fp8_checkpoint"] and "amax_history_fwd" in self.fp8_meta):
            return _empty_state()
        state = {
            "scale_fwd": self.fp8_meta["scale_fwd"].clone(),
            "amax_history_fwd": self.fp8_meta["amax_history_fwd"].clone(),
            "extra_fp8_variables": {"num_gemms": 1},
        }
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        if state is None or (isinstance(state, torch.Tensor) and state.numel() == 0):
            return
        if REFUSE_PICKLES:
            should_load_extra_state_pickle(bytes(state.detach().cpu().tolist()), "Linear")
        loaded = pickle.loads(bytes(state.detach().cpu().tolist()))
        self.fp8_meta["scale_fwd"] = loaded["scale_fwd"].clone()
        self.fp8_meta["amax_history_fwd"] = loaded["amax_history_fwd"].clone()
        self.fp8_meta["fp8_checkpoint"] = True


class Linear(TransformerEngineBaseModule):
    def __init__(
        self, in_features: int, out_features: int, sequence_parallel: bool = False,
        fuse_wgrad_accumulation: bool = False, tp_group: Any = None, tp_size: int = 1,
        get_rng_state_tracker: Any = None, init_method: Any = None, bias: bool = True,
        return_bias: bool = False, params_dtype: torch.dtype | None = None,
        parallel_mode: str | None = None, parameters_split: Any = None,
        device: torch.device | str = "cuda", ub_overlap_ag: bool = False,
        ub_overlap_rs: bool = False, ub_name: str | None = None,
    ) -> None:
        super().__init__()
        params_dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = bias
        self.return_bias = return_bias
        weight = torch.empty(out_features, in_features, device=device, dtype=params_dtype)
        self.weight = torch.nn.Parameter(weight)
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=params_dtype))
        else:
            self.bias = torch.Tensor().to(dtype=params_dtype, device=device)
        if torch.device(device).type != "meta":
            with torch.no_grad():
                (init_method or (lambda w: torch.nn.init.normal_(w, 0.0, 0.023)))(self.weight)
                if bias:
                    self.bias.zero_()

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None) -> torch.Tensor:
        if self._fp8_prepare():
            assert_dim_for_fp8_exec(inp, self.weight)
            self._record_amax(0, inp)
            self._record_amax(1, self.weight)
        return F.linear(inp, self.weight, self.bias if self.use_bias else None)


class _Norm(torch.nn.Module):
    def get_extra_state(self) -> torch.Tensor:
        return _empty_state()

    def set_extra_state(self, state: Any) -> None:
        return None


class LayerNorm(_Norm):
    def __init__(self, normalized_shape: Any, *, sequence_parallel: bool | None = None,
                 params_dtype: torch.dtype | None = None, eps: float = 1e-5,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 zero_centered_gamma: bool = False, sm_margin: int = 0) -> None:
        super().__init__()
        if params_dtype is not None:
            if dtype is not None:
                raise RuntimeError("Both `dtype` and `params_dtype` (deprecated) kwargs are provided")
            dtype = params_dtype
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        device = "cuda" if device is None else device
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self.weight = torch.nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(inp, tuple(self.weight.shape), self.weight, self.bias, self.eps)


class RMSNorm(_Norm):
    def __init__(self, normalized_shape: Any = None, eps: float = 1e-5,
                 sequence_parallel: bool | None = None, params_dtype: torch.dtype | None = None,
                 zero_centered_gamma: bool = False, hidden_size: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 sm_margin: int = 0) -> None:
        super().__init__()
        if params_dtype is not None:
            dtype = params_dtype
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        device = "cuda" if device is None else device
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(shape, device=device, dtype=dtype))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(inp, tuple(self.weight.shape), self.weight, self.eps)


# -- installing ---------------------------------------------------------------------------


def _module(name: str, package: bool = False, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    if package:
        module.__path__ = []  # type: ignore[attr-defined]
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def build(*, legacy: bool = False) -> dict[str, types.ModuleType]:
    """The stand-in's modules by import name (TE 2.x surface, or TE 1.x with ``legacy``)."""
    for cls, where in ((Linear, "module.linear"), (LayerNorm, "module.layernorm"),
                       (RMSNorm, "module.rmsnorm"), (TransformerEngineBaseModule, "module.base")):
        cls.__module__ = f"transformer_engine.pytorch.{where}"
    for cls in (Format, Recipe, DelayedScaling, LegacyDelayedScaling, Float8CurrentScaling,
                MXFP8BlockScaling):
        cls.__module__ = "transformer_engine.common.recipe"
    recipe_attrs: dict[str, Any] = {
        "Format": Format, "Recipe": Recipe,
        "DelayedScaling": LegacyDelayedScaling if legacy else DelayedScaling,
    }
    if not legacy:
        recipe_attrs |= {"Float8CurrentScaling": Float8CurrentScaling, "MXFP8BlockScaling": MXFP8BlockScaling}
    fp8 = _module("transformer_engine.pytorch.fp8", FP8GlobalStateManager=FP8GlobalStateManager,
                  check_fp8_support=check_fp8_support)
    pt_attrs: dict[str, Any] = {"Linear": Linear, "LayerNorm": LayerNorm, "fp8": fp8,
                                "FP8GlobalStateManager": FP8GlobalStateManager}
    if legacy:
        pt_attrs["fp8_autocast"] = legacy_fp8_autocast
    else:
        pt_attrs |= {"RMSNorm": RMSNorm, "autocast": autocast, "fp8_autocast": fp8_autocast,
                     "is_fp8_available": is_fp8_available, "is_mxfp8_available": is_mxfp8_available}
    global REFUSE_PICKLES
    REFUSE_PICKLES = not legacy
    pytorch = _module("transformer_engine.pytorch", package=True, **pt_attrs)
    recipe = _module("transformer_engine.common.recipe", **recipe_attrs)
    common = _module("transformer_engine.common", package=True, recipe=recipe)
    root = _module("transformer_engine", package=True, __version__=VERSION, common=common,
                   pytorch=pytorch)
    modules = {
        "transformer_engine": root,
        "transformer_engine.common": common,
        "transformer_engine.common.recipe": recipe,
        "transformer_engine.pytorch": pytorch,
        "transformer_engine.pytorch.fp8": fp8,
    }
    if not legacy:
        modules["transformer_engine.pytorch._extra_state"] = _module(
            "transformer_engine.pytorch._extra_state",
            UNSAFE_PICKLE_EXTRA_STATE_ENV=UNSAFE_PICKLE_EXTRA_STATE_ENV,
            should_load_extra_state_pickle=should_load_extra_state_pickle)
    return modules


def reset_state() -> None:
    FP8GlobalStateManager.FP8_ENABLED = False
    FP8GlobalStateManager.FP8_RECIPE = None
    FP8GlobalStateManager.SUPPORT = (True, "")
    FP8GlobalStateManager.ENTERED = []


def installed() -> bool:
    return sys.modules.get("transformer_engine") is not None
