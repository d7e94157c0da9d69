"""The core modes: true precision (32/64/16/bf16) and autocast mixed precision.

This module is also the core's plugin: it registers its modes through the same
``mixprec_modes`` hook as any third-party plugin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

from ._dtypes import dtype_name, parse_dtype, short_dtype_name
from ._interface import (
    FSDPPlan,
    ModeSpec,
    PrecisionMode,
    build_context,
    step_in_dtype,
    thread_default_dtype,
)
from ._options import check_bool
from ._scaler import LossScaler, ScalerConfig
from ._tensors import apply_to_float_tensors
from .exceptions import ModeOptionError, UnsupportedDeviceError, WrapError
from .hookspecs import hookimpl

__all__ = ["MixedPrecision", "TruePrecision"]

def _dtype(value: str | torch.dtype, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    return parse_dtype(value, allowed)


class _ScalingOptions:
    """Loss-scaler options shared by the fp16 modes."""

    def _init_scaler_options(self, dtype: torch.dtype, options: dict[str, Any]) -> None:
        if options and dtype is not torch.float16:
            raise ModeOptionError(
                f"Loss-scaler options ({', '.join(sorted(options))}) apply only to fp16 modes "
                "(16-mixed, 16-true); this mode does not scale the loss."
            )
        self._scaler_options = dict(options)
        if dtype is torch.float16:
            LossScaler(**options)  # validate now (names, types, ranges), before anything is wrapped

    def create_scaler(self) -> LossScaler | None:
        if getattr(self, "needs_scaling", False):
            return LossScaler(**self._scaler_options)
        return None


class TruePrecision(_ScalingOptions, PrecisionMode):
    """Parameters, buffers and the forward in one dtype (``32-true``, ``64-true``,
    ``16-true``, ``bf16-true``).

    :param dtype: ``"32"``, ``"64"``, ``"16"`` or ``"bf16"`` (or a torch dtype).
    :param master_weights: keep an fp32 master copy of every parameter in the
        optimizer (Apex O2): gradients are accumulated in fp32, the step runs on
        the masters and the model gets them cast back. 16/bf16 only.
    :param optimizer_dtype: dtype the optimizer computes in and keeps its state in
        when there are no master weights. Default fp32 for ``16-true`` (fp16
        optimizer state underflows: Adam's ``eps=1e-8`` is 0 in fp16), the model
        dtype otherwise. Parameters are still stored in ``dtype``.
    :param keep_output_dtype: return outputs in ``dtype`` instead of fp32 (16-bit modes;
        ``32-true`` leaves inputs and outputs as they are, ``64-true`` returns fp64).
    :param scaler_options: ``init_scale``, ``growth_factor``, ``backoff_factor``,
        ``growth_interval``, ``min_scale``, ``max_scale``, ``hysteresis`` (fp16 only).
    """

    def __init__(
        self,
        dtype: str | torch.dtype = "32",
        *,
        master_weights: bool = False,
        optimizer_dtype: str | torch.dtype | None = None,
        keep_output_dtype: bool = False,
        **scaler_options: Any,
    ) -> None:
        self.dtype = _dtype(dtype, (torch.float32, torch.float64, torch.float16, torch.bfloat16))
        self.name = f"{short_dtype_name(self.dtype)}-true"
        low = self.dtype in (torch.float16, torch.bfloat16)
        master_weights = check_bool(master_weights, "master_weights")
        if master_weights and not low:
            raise ModeOptionError(
                f"master_weights=True needs a 16-bit mode; {self.name} already keeps "
                "parameters at full precision."
            )
        self.master_weights = master_weights
        self.needs_scaling = self.dtype is torch.float16
        if optimizer_dtype is None:
            optim = torch.float32 if self.dtype is torch.float16 else self.dtype
        else:
            optim = _dtype(optimizer_dtype, (torch.float32, self.dtype))
        self.optimizer_dtype = optim
        self.keep_output_dtype = check_bool(keep_output_dtype, "keep_output_dtype")
        self._init_scaler_options(self.dtype, scaler_options)

    @property
    def param_dtype(self) -> torch.dtype:
        return self.dtype

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.master_weights:
            opts["master_weights"] = True
        if not self.master_weights and self.optimizer_dtype is not self.dtype:
            opts["optimizer_dtype"] = dtype_name(self.optimizer_dtype)
        if self.keep_output_dtype:
            opts["keep_output_dtype"] = True
        opts.update(self._scaler_options)
        return opts

    def validate(self, module: torch.nn.Module, device: torch.device) -> None:
        """16-bit modes refuse complex parameters: they cannot be stored in 16 bits."""
        if self.dtype not in (torch.float16, torch.bfloat16):
            return
        for name, p in module.named_parameters():
            if p.is_complex():
                raise WrapError(
                    f"Parameter {name!r} is {p.dtype}, which {self.name} cannot store in 16 "
                    "bits (torch's complex32 lacks the kernels to train it); use 32-true, "
                    "16-mixed or bf16-mixed, which keep complex parameters as they are."
                )

    def convert_module(self, module: torch.nn.Module) -> list[str]:
        n_params = n_buffers = 0
        with torch.no_grad():
            for p in module.parameters():
                if p.is_floating_point() and p.dtype is not self.dtype:
                    p.data = p.data.to(self.dtype)
                    n_params += 1
            for sub in module.modules():
                for key, buf in sub._buffers.items():
                    if buf is not None and buf.is_floating_point() and buf.dtype is not self.dtype:
                        sub._buffers[key] = buf.to(self.dtype)
                        n_buffers += 1
        if not n_params and not n_buffers:
            return [f"parameters and buffers already in {self.dtype}"]
        return [f"cast {n_params} parameters and {n_buffers} buffers to {self.dtype}"]

    def init_context(self, device: torch.device | str | None = None) -> contextlib.AbstractContextManager[None]:
        return build_context(self.dtype, device)

    def forward_context(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype is torch.float32:  # 32-true runs the forward as it is
            return contextlib.nullcontext()
        return thread_default_dtype(self.dtype)

    def convert_input(self, data: Any) -> Any:
        if self.dtype is torch.float32:  # as it is: fp64 data stays fp64
            return data
        return apply_to_float_tensors(data, lambda t: t.to(self.dtype))

    def convert_output(self, data: Any) -> Any:
        if self.keep_output_dtype or self.dtype in (torch.float32, torch.float64):
            return data
        return apply_to_float_tensors(data, lambda t: t.to(torch.float32))

    def optimizer_step_context(
        self, optimizer: torch.optim.Optimizer
    ) -> contextlib.AbstractContextManager[None]:
        if self.master_weights or self.optimizer_dtype is self.dtype:
            return contextlib.nullcontext()
        return step_in_dtype(optimizer, self.dtype, self.optimizer_dtype)

    def fsdp_plan(self) -> FSDPPlan:
        """FSDP2 (mixprec.distributed.fully_shard): parameters stored and reduced in
        ``dtype`` (the optimizer still steps in ``optimizer_dtype``); with master
        weights the sharded parameters stay fp32 (they are the masters, rounded to
        ``dtype`` once as here) and FSDP casts them for compute."""
        if self.master_weights:
            return FSDPPlan(param_dtype=self.dtype, reduce_dtype=torch.float32,
                            storage_dtype=torch.float32)
        return FSDPPlan()


class MixedPrecision(_ScalingOptions, PrecisionMode):
    """fp32 parameters, the forward under ``torch.autocast`` (``16-mixed``, ``bf16-mixed``).

    :param dtype: ``"16"`` or ``"bf16"``.
    :param keep_output_dtype: return outputs as autocast produced them instead of fp32.
    :param scaler_options: loss-scaler options (fp16 only), see :class:`LossScaler`.
    """

    def __init__(
        self, dtype: str | torch.dtype = "bf16", *, keep_output_dtype: bool = False,
        **scaler_options: Any,
    ) -> None:
        self.dtype = _dtype(dtype, (torch.float16, torch.bfloat16))
        self.name = f"{short_dtype_name(self.dtype)}-mixed"
        self.needs_scaling = self.dtype is torch.float16
        self.keep_output_dtype = check_bool(keep_output_dtype, "keep_output_dtype")
        self.device_type = "cpu"
        self._init_scaler_options(self.dtype, scaler_options)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"keep_output_dtype": True} if self.keep_output_dtype else {}
        opts.update(self._scaler_options)
        return opts

    def validate(self, module: torch.nn.Module, device: torch.device) -> None:
        if not torch.amp.is_autocast_available(device.type):
            raise UnsupportedDeviceError(
                f"{self.name} needs torch.autocast, which torch {torch.__version__} does not "
                f"offer on {device.type!r}; use a true mode such as '{short_dtype_name(self.dtype)}-true'.",
                device=device,
            )
        if (self.dtype is torch.bfloat16 and device.type == "cuda"
                and not torch.cuda.is_bf16_supported()):
            raise UnsupportedDeviceError(
                f"This GPU does not support bfloat16; use '16-mixed' instead of {self.name!r}.",
                device=device,
            )

    def convert_module(self, module: torch.nn.Module) -> list[str]:
        devices = {t.device.type for t in module.parameters()}
        self.device_type = devices.pop() if len(devices) == 1 else "cpu"
        return [f"forward under torch.autocast({self.device_type!r}, {self.dtype})"]

    def forward_context(self) -> contextlib.AbstractContextManager[None]:
        return torch.autocast(self.device_type, dtype=self.dtype)

    def fsdp_plan(self) -> FSDPPlan:
        """FSDP2 (mixprec.distributed.fully_shard): fp32 sharded parameters, FSDP
        all-gathers them in ``dtype`` and reduces gradients in fp32; no autocast
        (``fully_shard(..., autocast=True)`` keeps it)."""
        return FSDPPlan(param_dtype=self.dtype, reduce_dtype=torch.float32,
                        forward_context=False)

    def convert_output(self, data: Any) -> Any:
        if self.keep_output_dtype:
            return data
        return apply_to_float_tensors(data, lambda t: t.to(torch.float32))


# The registered factories spell every option out (the scaler's from ScalerConfig's
# fields), so that the registry can name an unknown one and suggest the closest
# ("master_weight" -> "master_weights").


def _factory(
    cls: type[TruePrecision | MixedPrecision], dtype: str, options: dict[str, Any],
    scaling: bool = False,
) -> Callable[..., PrecisionMode]:
    def factory(**given: Any) -> PrecisionMode:
        return cls(dtype, **given)

    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(k, keyword, default=v) for k, v in options.items()]
    if scaling:
        params += [inspect.Parameter(f.name, keyword, default=f.default)
                   for f in dataclasses.fields(ScalerConfig)]
    factory.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    factory.__name__ = f"{short_dtype_name(parse_dtype(dtype))}_{cls.__name__}"
    return factory


_TRUE = {"master_weights": False, "optimizer_dtype": None, "keep_output_dtype": False}
_MIXED = {"keep_output_dtype": False}


@hookimpl
def mixprec_modes() -> list[ModeSpec]:
    return [
        ModeSpec("32-true", _factory(TruePrecision, "32", _TRUE),
                 "fp32 weights and compute (the baseline)"),
        ModeSpec("64-true", _factory(TruePrecision, "64", _TRUE),
                 "fp64 weights and compute, for numerics checks"),
        ModeSpec("16-true", _factory(TruePrecision, "16", _TRUE, scaling=True),
                 "fp16 weights and compute, loss scaling, fp32 optimizer math; "
                 "master_weights=True for fp32 masters"),
        ModeSpec("bf16-true", _factory(TruePrecision, "bf16", _TRUE),
                 "bf16 weights and compute; master_weights=True for fp32 masters"),
        ModeSpec("16-mixed", _factory(MixedPrecision, "16", _MIXED, scaling=True), "fp32 weights, fp16 autocast, dynamic loss scaling"),
        ModeSpec("bf16-mixed", _factory(MixedPrecision, "bf16", _MIXED), "fp32 weights, bf16 autocast"),
    ]
