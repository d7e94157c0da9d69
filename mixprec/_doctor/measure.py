"""Per-layer measurements of one mode against fp32, on copies of the user's model.

Three passes over the same few batches:

- :func:`reference_pass` (once): the fp32 copy's model output, loss and gradients,
  and per layer the largest |activation| and |gradient| and the exponents of the
  gradients (for the fp16 underflow share at any loss scale);
- :func:`converted_pass` (per mode): the copy the mode converted (its own
  ``convert_module`` and forward context, through ``PrecisionWrapper.wrap``) runs
  forward and backward; every examined layer's output is compared with the fp32
  layer run on the very input the converted layer got (the layer's own error),
  the model output with the fp32 model's, and each layer's weight gradient with
  the fp32 model's;
- :func:`impact_pass` (per mode): for each layer, the fp32 model with only that
  layer run as the mode runs it: the model-output SQNR and the loss change that
  layer alone causes (its sensitivity).

The layers examined are ``nn.Linear``, ``nn.Embedding`` and normalisation layers
(``nn.LayerNorm``, ``nn.GroupNorm``, batch norms, ``nn.RMSNorm`` and any module
whose class name ends in ``Norm`` and holds a ``weight``), found in the fp32 copy;
a converted layer is the module at the same dotted name in the converted copy.
The model output is the output of the model's top module (its floating tensors).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._interface import default_dtype
from .._tensors import apply_to_float_tensors
from .sqnr import PowerSum, amax, float_tensors

__all__ = [
    "OUTPUT",
    "ConvertedStats",
    "LayerReference",
    "Reference",
    "converted_pass",
    "impact_pass",
    "is_layer",
    "layer_names",
    "reference_pass",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]

#: the name of the model output in per-layer tables
OUTPUT = "(output)"

_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm,
                                       nn.modules.batchnorm._NormBase)
if hasattr(nn, "RMSNorm"):
    _NORMS += (nn.RMSNorm,)
_EXPONENT_OFFSET = 200  # frexp exponents of fp32/fp64 values, shifted to be >= 0


def is_layer(module: nn.Module) -> bool:
    """True for the layers the doctor examines (see the module docstring)."""
    if isinstance(module, (nn.Linear, nn.Embedding, *_NORMS)):
        return True
    return type(module).__name__.endswith("Norm") and isinstance(
        getattr(module, "weight", None), torch.Tensor)


def layer_names(model: nn.Module) -> list[str]:
    """Dotted names of the examined layers of ``model``, in module order."""
    return [n for n, m in model.named_modules() if n and is_layer(m)]


def _cast(data: Any, dtype: torch.dtype) -> Any:
    return apply_to_float_tensors(data, lambda t: t.to(dtype))


def _upcast(data: Any) -> Any:
    return apply_to_float_tensors(data, lambda t: t.detach().to(torch.float32))


@contextlib.contextmanager
def _plain_fp32(device_type: str) -> Iterator[None]:
    """fp32 as in a plain model: no autocast, fp32 default dtype, no grad."""
    with torch.no_grad(), default_dtype(torch.float32), \
            torch.autocast(device_type, enabled=False):
        yield


# -- the fp32 reference ------------------------------------------------------------------


@dataclass
class LayerReference:
    """What the fp32 model shows about one layer, over the measured batches."""

    kind: str
    params: int
    act_amax: float = 0.0
    grad_amax: float = 0.0
    #: frexp exponent histogram of the nonzero gradient magnitudes (output and weight)
    grad_exponents: torch.Tensor = field(
        default_factory=lambda: torch.zeros(2 * _EXPONENT_OFFSET, dtype=torch.long))

    def add_grads(self, grads: Sequence[torch.Tensor]) -> None:
        self.grad_amax = max(self.grad_amax, amax(grads))
        for g in grads:
            mag = g.detach().abs().flatten()
            mag = mag[mag > 0]
            if mag.numel():
                _, exp = torch.frexp(mag.to(torch.float32))
                idx = (exp.to(torch.long) + _EXPONENT_OFFSET).clamp(0, 2 * _EXPONENT_OFFSET - 1)
                self.grad_exponents += torch.bincount(idx, minlength=2 * _EXPONENT_OFFSET).cpu()

    def underflow_share(self, scale: float) -> float | None:
        """Share of nonzero gradient elements that fp16 flushes to zero at ``scale``:
        ``|g| * scale < 2**-25`` (exact for power-of-two scales)."""
        total = int(self.grad_exponents.sum())
        if not total:
            return None
        # |g| = m * 2**e with m in [0.5, 1): |g| * scale < 2**-25 for e <= -25 - log2(scale)
        limit = math.floor(-25 - math.log2(scale))
        upto = limit + _EXPONENT_OFFSET + 1
        flushed = int(self.grad_exponents[: max(0, min(upto, len(self.grad_exponents)))].sum())
        return flushed / total


@dataclass
class Reference:
    """The fp32 copy and what it computed on each measured batch."""

    model: nn.Module
    layers: dict[str, LayerReference]
    outputs: list[list[torch.Tensor]]
    losses: list[float]
    grads: list[dict[str, torch.Tensor]]
    device_type: str


def _direct_params(module: nn.Module, name: str) -> list[str]:
    return [f"{name}.{k}" for k, p in module._parameters.items() if p is not None]


def reference_pass(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn) -> Reference:
    """Run the fp32 ``model`` (a copy) forward and backward on ``batches``."""
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    names = layer_names(model)
    modules = dict(model.named_modules())
    layers = {n: LayerReference(type(modules[n]).__name__,
                                sum(p.numel() for p in modules[n]._parameters.values()
                                    if p is not None)) for n in names}
    outputs: list[list[torch.Tensor]] = []
    losses: list[float] = []
    grads: list[dict[str, torch.Tensor]] = []
    out_grads: dict[str, list[torch.Tensor]] = {}

    def on_forward(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensors = float_tensors(output)
            ref = layers[name]
            ref.act_amax = max(ref.act_amax, amax(tensors))
            for t in tensors:
                if t.requires_grad:
                    t.register_hook(lambda g, n=name: out_grads.setdefault(n, []).append(g))
        return hook

    captured: list[Any] = []
    handles = [modules[n].register_forward_hook(on_forward(n)) for n in names]
    handles.append(model.register_forward_hook(lambda m, a, out: captured.append(out)))
    named = dict(model.named_parameters(remove_duplicate=False))
    try:
        with torch.autocast(device_type, enabled=False), default_dtype(torch.float32):
            for batch in batches:
                captured.clear()
                out_grads.clear()
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                outputs.append([t.detach().float() for t in float_tensors(captured[-1])])
                losses.append(float(loss.detach()))
                loss.backward()
                grads.append({n: p.grad.detach().clone() for n, p in named.items()
                              if p.grad is not None})
                for n in names:
                    weight = [g for k in _direct_params(modules[n], n)
                              if (g := named[k].grad) is not None]
                    layers[n].add_grads(out_grads.get(n, []) + weight)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return Reference(model, layers, outputs, losses, grads, device_type)


# -- the converted copy ------------------------------------------------------------------


@dataclass
class ConvertedStats:
    """What one mode's converted copy shows, per layer, against the fp32 reference."""

    out: dict[str, PowerSum] = field(default_factory=dict)
    grad: dict[str, PowerSum] = field(default_factory=dict)
    #: dtype of the first floating input and output of each layer as the mode runs it
    in_dtype: dict[str, torch.dtype] = field(default_factory=dict)
    out_dtype: dict[str, torch.dtype] = field(default_factory=dict)
    #: layers whose output held inf/NaN where the fp32 layer's did not
    nonfinite: set[str] = field(default_factory=set)
    output: PowerSum = field(default_factory=PowerSum)
    losses: list[float] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _module_at(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def converted_pass(reference: Reference, wrapped: nn.Module, inner: nn.Module,
                   batches: Sequence[Any], loss_fn: LossFn, scale: float) -> ConvertedStats:
    """Forward and backward of the converted copy on ``batches``, compared with fp32.

    :param wrapped: the module ``PrecisionWrapper.wrap`` returned (runs the mode's
        forward context); ``inner`` is the converted model inside it.
    :param scale: the loss scale the mode trains with (1 where it does not scale);
        the backward runs on ``loss * scale`` and gradients are divided by it, as
        ``opt.backward`` and ``opt.step`` would do.
    """
    stats = ConvertedStats()
    ref_modules = dict(reference.model.named_modules())
    device_type = reference.device_type
    handles = []

    def on_forward(name: str, ref_layer: nn.Module) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            inputs = float_tensors((args, kwargs))
            outs = float_tensors(output)
            if inputs:
                stats.in_dtype.setdefault(name, inputs[0].dtype)
            if outs:
                stats.out_dtype.setdefault(name, outs[0].dtype)
            with _plain_fp32(device_type):
                expected = float_tensors(ref_layer(*_upcast(args), **_upcast(kwargs)))
            power = stats.out.setdefault(name, PowerSum())
            for r, t in zip(expected, outs):
                power.add(r, t)
                if bool(torch.isfinite(r).all()) and not bool(torch.isfinite(t).all()):
                    stats.nonfinite.add(name)
        return hook

    for name in reference.layers:
        module = _module_at(inner, name)
        if module is None:
            stats.missing.append(name)
            continue
        handles.append(module.register_forward_hook(on_forward(name, ref_modules[name]),
                                                    with_kwargs=True))
    captured: list[Any] = []
    handles.append(inner.register_forward_hook(lambda m, a, out: captured.append(out)))
    named = dict(inner.named_parameters(remove_duplicate=False))
    try:
        for index, batch in enumerate(batches):
            captured.clear()
            loss = loss_fn(wrapped, batch)
            stats.losses.append(float(loss.detach()))
            for r, t in zip(reference.outputs[index], float_tensors(captured[-1])):
                stats.output.add(r, t)
            (loss * scale).backward()
            for name in reference.layers:
                module = _module_at(inner, name)
                if module is None:
                    continue
                power = None
                for key in _direct_params(ref_modules[name], name):
                    ref_grad = reference.grads[index].get(key)
                    param = named.get(key)
                    if ref_grad is None or param is None or param.grad is None:
                        continue
                    if param.grad.shape != ref_grad.shape:
                        continue
                    power = power or stats.grad.setdefault(name, PowerSum())
                    power.add(ref_grad, param.grad.to(torch.float64) / scale)
            for p in named.values():
                p.grad = None
    finally:
        for h in handles:
            h.remove()
    return stats


# -- one layer at a time -----------------------------------------------------------------


@dataclass
class Impact:
    """The fp32 model with one layer run as the mode runs it."""

    output: PowerSum
    loss_change: float  # relative: (loss - fp32 loss) / fp32 loss, mean over batches


def impact_pass(reference: Reference, inner: nn.Module, batches: Sequence[Any],
                loss_fn: LossFn, forward_context: Callable[[], Any],
                stats: ConvertedStats) -> dict[str, Impact]:
    """For each layer: the fp32 model whose layer ``name`` alone is the converted one.

    The converted layer gets the fp32 input cast to the dtype it got in the
    converted model, runs inside the mode's forward context, and its output goes on
    in fp32.
    """
    model = reference.model
    ref_modules = dict(model.named_modules())
    device_type = reference.device_type
    result: dict[str, Impact] = {}
    captured: list[Any] = []
    root = model.register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        for name in reference.layers:
            converted = _module_at(inner, name)
            if converted is None or (name not in stats.in_dtype and name not in stats.out):
                continue
            dtype = stats.in_dtype.get(name)

            def swap(module: nn.Module, args: Any, kwargs: Any, output: Any,
                     converted: nn.Module = converted, dtype: torch.dtype | None = dtype) -> Any:
                if dtype is not None:
                    args, kwargs = _cast((args, kwargs), dtype)
                with forward_context():
                    out = converted(*args, **kwargs)
                return _upcast(out)

            handle = ref_modules[name].register_forward_hook(swap, with_kwargs=True)
            power = PowerSum()
            changes = []
            try:
                with torch.no_grad(), torch.autocast(device_type, enabled=False):
                    for index, batch in enumerate(batches):
                        captured.clear()
                        loss = float(loss_fn(model, batch))
                        for r, t in zip(reference.outputs[index], float_tensors(captured[-1])):
                            power.add(r, t)
                        base = reference.losses[index]
                        changes.append((loss - base) / abs(base) if base else math.nan)
            finally:
                handle.remove()
            result[name] = Impact(power, sum(changes) / len(changes) if changes else math.nan)
    finally:
        root.remove()
    return result
