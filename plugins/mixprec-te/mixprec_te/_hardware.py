"""Can this device run Transformer Engine's FP8? Checked before anything is changed.

The checks are split so each can be tested without a GPU: the device type, the
compute capability (a pure function of numbers), and TE's own verdict.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from mixprec.exceptions import UnsupportedDeviceError

from ._te import fp8_support, te_version

__all__ = ["MIN_CAPABILITY", "check_cuda_device", "check_fp8_capability", "check_hardware"]

#: FP8 tensor cores arrived with Ada (8.9); Hopper is 9.0, Blackwell 10.x/12.x.
MIN_CAPABILITY = (8, 9)

#: recipe class -> TE function that says whether this GPU can run it
_RECIPE_CHECKS = {
    "MXFP8BlockScaling": "is_mxfp8_available",
    "Float8BlockScaling": "is_fp8_block_scaling_available",
    "NVFP4BlockScaling": "is_nvfp4_available",
}


def check_cuda_device(device: torch.device, mode: str) -> None:
    """Raise :class:`UnsupportedDeviceError` unless ``device`` is a CUDA device."""
    if device.type != "cuda":
        raise UnsupportedDeviceError(
            f"Mode {mode!r} runs FP8 through Transformer Engine on NVIDIA GPUs only, but the "
            f"model is on {str(device)!r}; move it to a CUDA device (model.cuda()) before "
            "wrapping, or use 'bf16-mixed' (or an fp8-* mode from mixprec-torchao) here.",
            device=device,
        )
    if not torch.cuda.is_available():
        raise UnsupportedDeviceError(
            f"Mode {mode!r} needs a CUDA GPU, but torch {torch.__version__} sees none "
            f"(torch.cuda.is_available() is False); install a CUDA build of torch on a "
            "machine with an NVIDIA driver.",
            device=device,
        )


def check_fp8_capability(
    capability: tuple[int, int], device_name: str, device: Any, mode: str,
    te_verdict: tuple[bool, str] = (True, ""),
) -> None:
    """Raise :class:`UnsupportedDeviceError` if a GPU of ``capability`` cannot run FP8.

    :param te_verdict: TE's ``(available, reason)`` for the device, which also covers
        CUDA and cuBLASLt versions.
    """
    where = f"{device_name} ({device})"
    if tuple(capability) < MIN_CAPABILITY:
        major, minor = capability
        raise UnsupportedDeviceError(
            f"Mode {mode!r} needs a GPU with FP8 tensor cores (compute capability 8.9 or "
            f"higher: Ada, Hopper, Blackwell), but {where} has {major}.{minor}; use "
            "'bf16-mixed' on this GPU.",
            device=device,
        )
    ok, reason = te_verdict
    if not ok:
        raise UnsupportedDeviceError(
            f"Transformer Engine {te_version()} cannot run FP8 on {where}: "
            f"{reason.rstrip('.') or 'no reason given'}; update what it names, or use "
            "'bf16-mixed' on this machine.",
            device=device,
        )


def check_hardware(te: ModuleType, device: torch.device, mode: str, recipe: Any = None) -> None:
    """All device checks for ``mode`` on ``device`` (a CUDA device with FP8, and the
    recipe's own needs, such as Blackwell for MXFP8)."""
    check_cuda_device(device, mode)
    with torch.cuda.device(device):
        capability = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        check_fp8_capability(capability, name, device, mode, fp8_support(te))
        func = _RECIPE_CHECKS.get(type(recipe).__name__)
        check = getattr(te, func, None) if func else None
        if check is not None:
            ok, reason = check(return_reason=True)
            if not ok:
                raise UnsupportedDeviceError(
                    f"The {type(recipe).__name__} recipe cannot run on {name} ({device}): "
                    f"{str(reason).rstrip('.')}; use a DelayedScaling or Float8CurrentScaling "
                    "recipe on this GPU.",
                    device=device,
                )
