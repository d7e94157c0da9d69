"""Access to Transformer Engine: the lazy import and the API differences between releases.

Everything the plugin calls in ``transformer_engine`` goes through this module,
so the rest of the code (and the CPU tests' stand-in) depends on one small,
documented surface:

- ``transformer_engine.pytorch``: ``Linear``, ``LayerNorm``, ``RMSNorm`` (where
  present), ``autocast(enabled=, recipe=)`` (TE >= 2.8; ``fp8_autocast(enabled=,
  fp8_recipe=)`` before, deprecated since), ``is_fp8_available(return_reason=)``
  (``fp8.check_fp8_support()`` before);
- ``transformer_engine.common.recipe``: ``Format``, ``DelayedScaling``,
  ``Float8CurrentScaling`` (TE >= 2.2).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from types import ModuleType
from typing import Any

from mixprec.exceptions import MissingDependencyError

__all__ = [
    "INSTALL_HINT",
    "PIP_PACKAGE",
    "UNSAFE_PICKLE_ENV",
    "extra_state_refusal",
    "fp8_autocast",
    "fp8_support",
    "is_te_module",
    "load_recipe_module",
    "load_te",
    "te_version",
]

#: The pip requirement that provides Transformer Engine's PyTorch bindings.
PIP_PACKAGE = "transformer-engine[pytorch]"
#: TE's PyTorch extension compiles against the installed torch, hence no build isolation.
INSTALL_HINT = f'pip install --no-build-isolation "{PIP_PACKAGE}"'


def _import(name: str, mode: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "transformer_engine":
            raise MissingDependencyError(
                f"Mode {mode!r} needs NVIDIA Transformer Engine, which is not installed; "
                f"on a CUDA machine run: {INSTALL_HINT}",
                package=PIP_PACKAGE,
            ) from None
        raise _broken(mode, exc) from exc
    except (ImportError, OSError, RuntimeError, AssertionError) as exc:
        raise _broken(mode, exc) from exc


def _broken(mode: str, exc: BaseException) -> MissingDependencyError:
    return MissingDependencyError(
        f"Mode {mode!r} needs NVIDIA Transformer Engine, which is installed but cannot be "
        f"loaded ({type(exc).__name__}: {exc}); it needs a CUDA driver and a build that "
        f"matches this torch: reinstall it with {INSTALL_HINT}",
        package=PIP_PACKAGE,
    )


def load_te(mode: str = "transformer-engine") -> ModuleType:
    """``transformer_engine.pytorch``, or a :class:`MissingDependencyError` naming the package."""
    return _import("transformer_engine.pytorch", mode)


def load_recipe_module(mode: str = "transformer-engine") -> ModuleType:
    """``transformer_engine.common.recipe`` (recipes and ``Format``)."""
    return _import("transformer_engine.common.recipe", mode)


def te_version() -> str:
    """The installed Transformer Engine version, ``"?"`` if it does not say."""
    try:
        return str(importlib.import_module("transformer_engine").__version__)
    except (ImportError, AttributeError, OSError, RuntimeError):
        return "?"


def _takes(func: Any, parameter: str) -> bool:
    try:
        return parameter in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def fp8_autocast(te: ModuleType, recipe: Any) -> contextlib.AbstractContextManager[Any]:
    """TE's FP8 autocast with ``recipe``: ``te.autocast`` where it exists (TE >= 2.8
    deprecates ``fp8_autocast``), ``te.fp8_autocast`` on older releases."""
    autocast = getattr(te, "autocast", None)
    if autocast is not None and _takes(autocast, "recipe"):
        return autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def fp8_support(te: ModuleType) -> tuple[bool, str]:
    """TE's own verdict on FP8 for the current CUDA device: ``(available, reason)``.

    Besides the compute capability TE checks the CUDA and cuBLASLt versions (FP8
    on Ada needs CUDA >= 12.1). Returns ``(True, "")`` if this TE has no such check.
    """
    check = getattr(te, "is_fp8_available", None)
    if check is not None and _takes(check, "return_reason"):
        ok, reason = check(return_reason=True)
        return bool(ok), str(reason)
    legacy = getattr(getattr(te, "fp8", None), "check_fp8_support", None)
    if legacy is not None:
        ok, reason = legacy()
        return bool(ok), str(reason)
    return True, ""


#: Recent TE releases unpickle delayed-scaling ``_extra_state`` only with this set to 1.
UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


def extra_state_refusal(payload: Any, context: str) -> str | None:
    """TE's reason for refusing to load the ``_extra_state`` ``payload``, or None.

    Delayed scaling stores its amax history and scales as a pickle inside a
    ``uint8`` tensor; recent TE releases refuse to unpickle it unless
    ``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1`` (a checkpoint's pickle can run code).
    Asking TE's own classifier first lets mixprec refuse before anything is loaded.
    """
    try:
        checks = importlib.import_module("transformer_engine.pytorch._extra_state")
    except ImportError:
        return None  # older TE: loads the pickle as it always did
    should_load = getattr(checks, "should_load_extra_state_pickle", None)
    if should_load is None or not hasattr(payload, "numel") or payload.numel() == 0:
        return None
    try:
        should_load(bytes(payload.detach().cpu().flatten().tolist()), context)  # no numpy needed
    except RuntimeError as exc:
        return str(exc)
    return None


def is_te_module(module: object) -> bool:
    """True for a Transformer Engine layer (any class defined in ``transformer_engine``)."""
    return type(module).__module__.split(".")[0] == "transformer_engine"
