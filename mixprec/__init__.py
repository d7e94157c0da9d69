"""mixprec: run any PyTorch training loop in another numeric precision.

    model, opt = mixprec.wrap(model, opt, mode="16-mixed")
    opt.backward(loss); opt.step(); opt.zero_grad()
"""

from . import exceptions, hookspecs
from ._api import init_module, unwrap, wrap
from ._builtin_modes import MixedPrecision, TruePrecision
from ._doctor import doctor
from ._interface import ModeSpec, OptimizerMode, PrecisionMode, build_context, step_in_dtype
from ._module import WrappedModule, is_wrapped
from ._monitor import Monitor
from ._optimizer import WrappedOptimizer
from ._registry import ModeEntry, Registry, registry, use_registry
from ._scaler import LossScaler
from ._tensors import apply_to_float_tensors
from ._version import PLUGIN_API_VERSION, __version__
from ._wrapper import PrecisionWrapper
from .exceptions import MixprecError, MixprecWarning
from .hookspecs import hookimpl

__all__ = [
    "PLUGIN_API_VERSION",
    "LossScaler",
    "MixedPrecision",
    "MixprecError",
    "MixprecWarning",
    "ModeEntry",
    "ModeSpec",
    "Monitor",
    "OptimizerMode",
    "PrecisionMode",
    "PrecisionWrapper",
    "Registry",
    "TruePrecision",
    "WrappedModule",
    "WrappedOptimizer",
    "__version__",
    "apply_to_float_tensors",
    "build_context",
    "doctor",
    "exceptions",
    "hookimpl",
    "hookspecs",
    "init_module",
    "is_wrapped",
    "registry",
    "step_in_dtype",
    "unwrap",
    "use_registry",
    "wrap",
]
