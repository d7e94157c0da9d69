"""Errors raised by mixprec.

Every error mixprec raises derives from :class:`MixprecError` and from the
builtin it behaves like, so ``except ValueError`` keeps working::

    MixprecError
    ├── ModeError (ValueError)
    │   ├── UnknownModeError
    │   ├── ModeSyntaxError
    │   ├── DuplicateModeError
    │   └── ModeOptionError
    ├── MissingDependencyError (ImportError)
    ├── UnsupportedDeviceError (RuntimeError)
    ├── WrapError (ValueError)
    │   ├── AlreadyWrappedError
    │   └── OptimizerMismatchError
    ├── BackwardError (RuntimeError)
    ├── NumericsError (FloatingPointError)
    ├── CheckpointError (ValueError)
    └── PluginError (RuntimeError)
        └── ModeFactoryError

Each error carries the facts it talks about as attributes (``.mode``,
``.available``, ``.provider`` …) so programs need not parse messages.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AlreadyWrappedError",
    "BackwardError",
    "CheckpointError",
    "DuplicateModeError",
    "MissingDependencyError",
    "MixprecError",
    "MixprecWarning",
    "ModeError",
    "ModeFactoryError",
    "ModeOptionError",
    "ModeSyntaxError",
    "NumericsError",
    "OptimizerMismatchError",
    "PluginError",
    "UnknownModeError",
    "UnsupportedDeviceError",
    "WrapError",
]


class MixprecError(Exception):
    """Base class of every error mixprec raises."""


class MixprecWarning(UserWarning):
    """Warnings mixprec emits (frozen weights, loss-scale collapse, …)."""


class ModeError(MixprecError, ValueError):
    """A mode string or mode object cannot be used."""


class UnknownModeError(ModeError):
    """No installed plugin provides the requested mode.

    :ivar mode: the name that was asked for.
    :ivar available: sorted names of the modes that are installed.
    :ivar provider: the first-party distribution that provides ``mode``, if any.
    """

    def __init__(
        self, message: str, *, mode: str, available: Sequence[str], provider: str | None
    ) -> None:
        super().__init__(message)
        self.mode = mode
        self.available = list(available)
        self.provider = provider


class ModeSyntaxError(ModeError):
    """A mode string does not follow ``precision[+optimizer…]``.

    :ivar spec: the string that was given.
    """

    def __init__(self, message: str, *, spec: str) -> None:
        super().__init__(message)
        self.spec = spec


class DuplicateModeError(ModeError):
    """Two distributions register the same mode name.

    :ivar mode: the contested name.
    :ivar providers: the distributions that both claim it.
    """

    def __init__(self, message: str, *, mode: str, providers: Sequence[str]) -> None:
        super().__init__(message)
        self.mode = mode
        self.providers = list(providers)


class ModeOptionError(ModeError):
    """A mode was given an option it does not take, or a bad value for one."""


class MissingDependencyError(MixprecError, ImportError):
    """A mode needs a library that is not installed.

    :ivar package: the pip requirement that fixes it.
    """

    def __init__(self, message: str, *, package: str) -> None:
        super().__init__(message)
        self.package = package


class UnsupportedDeviceError(MixprecError, RuntimeError):
    """The mode cannot run on the model's device.

    :ivar device: the device that was found.
    """

    def __init__(self, message: str, *, device: object = None) -> None:
        super().__init__(message)
        self.device = device


class WrapError(MixprecError, ValueError):
    """``wrap`` refused its arguments; nothing was changed."""


class AlreadyWrappedError(WrapError):
    """The model or optimizer is already wrapped by mixprec."""


class OptimizerMismatchError(WrapError):
    """The optimizer holds parameters that are not the model's."""


class BackwardError(MixprecError, RuntimeError):
    """Gradients did not come through ``opt.backward(loss)`` where the mode needs it."""


class NumericsError(MixprecError, FloatingPointError):
    """A value no longer fits its dtype (an fp16 weight past 65504); ``.parameter``
    names it. Raised before the model is written: the weights stay finite."""

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


class CheckpointError(MixprecError, ValueError):
    """A checkpoint does not fit the wrapped model, optimizer or mode."""


class PluginError(MixprecError, RuntimeError):
    """A plugin could not be loaded or broke its contract.

    :ivar plugin: the distribution (entry-point) name.
    """

    def __init__(self, message: str, *, plugin: str) -> None:
        super().__init__(message)
        self.plugin = plugin


class ModeFactoryError(PluginError):
    """A plugin's mode factory failed to build its mode: an import inside it
    failed, or it returned something that is not a mode.

    :ivar plugin: the distribution that provides the mode.
    :ivar mode: the mode's name.
    :ivar missing: the module that could not be imported, if an import failed and
        the module is known.
    """

    def __init__(self, message: str, *, plugin: str, mode: str, missing: str | None) -> None:
        super().__init__(message, plugin=plugin)
        self.mode = mode
        self.missing = missing
