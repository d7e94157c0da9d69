"""Quantized Linear layers: bitsandbytes' layers with a forward and a
(de)serialisation that mixprec owns.

Why not bitsandbytes' layers as they are (0.50.2, checked on torch 2.13 CPU):

- ``Linear4bit``/``Linear8bitLt`` cast the bias *in place* to the input dtype
  on every forward, so a trainable fp32 bias silently becomes bf16/fp16.
  Here the bias keeps its dtype and is cast (differentiably) per call.
- ``Linear4bit`` on an AVX512-BF16 CPU repacks its weight on the first
  inference forward: the constants are rounded to bf16 and double quantization
  is undone, so the layer's values and state dict change. That path is off here.
- ``Linear4bit`` cannot load its own state dict, ``Linear8bitLt`` cannot load
  one after a forward pass: both load here, quantized or full-precision
  checkpoints alike, also into layers built on the ``meta`` device.
- ``Linear8bitLt`` with trainable weights fails on 3-D inputs on the CPU
  (``t() expects a tensor with <= 2 dimensions``) and reuses int8 weights
  quantized before the last optimizer step when gradients are zeroed rather
  than set to None: here inputs are flattened and trainable weights are
  re-quantized on every forward.

transformers' ``Conv1D`` (the GPT-2 family) stores its weight as ``(in, out)`` and
computes ``x @ weight + bias``: the frozen modes quantize it as the Linear it is,
with the transposed weight, as transformers' bitsandbytes integration does. Its
quantized state dict is then the one transformers writes for such a layer; a
full-precision checkpoint loads in the Conv1D's own ``(in, out)`` layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from bitsandbytes.nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit
from bitsandbytes.utils import unpack_tensor_to_dict

from mixprec.exceptions import CheckpointError

__all__ = ["QuantConfig", "QuantLinear4bit", "QuantLinear8bit", "is_quantized_layer"]

#: the real torch class, also while ``init_module`` replaces ``torch.nn.Linear``
TorchLinear = torch.nn.modules.linear.Linear


@dataclass(frozen=True)
class QuantConfig:
    """How one mode quantizes Linear layers.

    :param kind: ``"4bit"`` or ``"int8"``.
    :param quant_type: ``"nf4"``/``"fp4"`` (4-bit) or ``"int8"``.
    :param double_quant: quantize the 4-bit constants again (``-dq`` modes).
    :param blocksize: 4-bit block size.
    :param quant_storage: dtype the packed 4-bit data is stored as.
    :param compute_dtype: dtype the layer computes in.
    :param trainable: int8 layers keep trainable ``compute_dtype`` weights (``int8-training``).
    """

    kind: str
    quant_type: str
    double_quant: bool = False
    blocksize: int = 64
    quant_storage: torch.dtype = torch.uint8
    compute_dtype: torch.dtype = torch.bfloat16
    trainable: bool = False

    @property
    def mode_name(self) -> str:
        if self.kind == "int8":
            return "int8-training" if self.trainable else "int8"
        return self.quant_type + ("-dq" if self.double_quant else "")


def is_quantized_layer(module: torch.nn.Module) -> bool:
    """True for the layers this plugin builds."""
    return isinstance(module, (QuantLinear4bit, QuantLinear8bit))


#: elements quantized at a time: bounds the temporaries of one layer's quantization
CHUNK_ELEMENTS = 2**18


def quantize_4bit(weight: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, Any]:
    """``bitsandbytes.functional.quantize_4bit`` of ``weight``, computed in chunks.

    The result is bit-identical to one call (every chunk starts on a block
    boundary and holds an even number of values; the double quantization of the
    constants runs once on all of them), but the temporaries — bitsandbytes' CPU
    path makes several fp32/int32 copies of its input — stay the size of a chunk.
    """
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        weight = weight.float()
    flat = weight.detach().reshape(-1)
    step = max(config.blocksize, CHUNK_ELEMENTS // config.blocksize * config.blocksize)
    if flat.numel() <= step:
        return bnbF.quantize_4bit(weight.detach(), blocksize=config.blocksize,
                                  compress_statistics=config.double_quant,
                                  quant_type=config.quant_type,
                                  quant_storage=config.quant_storage)
    packed, absmax = [], []
    for start in range(0, flat.numel(), step):
        out, scale = torch.ops.bitsandbytes.quantize_4bit.default(
            flat[start:start + step], config.blocksize, config.quant_type, config.quant_storage)
        packed.append(out)
        absmax.append(scale)
    data, scales = torch.cat(packed), torch.cat(absmax)
    del packed, absmax
    code = bnbF.get_4bit_type(config.quant_type, device=weight.device)
    common = {"shape": weight.shape, "dtype": weight.dtype, "blocksize": config.blocksize,
              "code": code, "quant_type": config.quant_type}
    if config.double_quant:
        offset = scales.mean()
        nested, state2 = bnbF.quantize_blockwise(scales - offset, blocksize=256)
        return data, bnbF.QuantState(absmax=nested, offset=offset, state2=state2, **common)
    return data, bnbF.QuantState(absmax=scales, **common)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``int8_vectorwise_quant`` of ``weight`` (via fp16, as bitsandbytes does), a few
    rows at a time: the scales are per row, so the result is the same as one call."""
    rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[1]))
    parts = [bnbF.int8_vectorwise_quant(chunk.to(torch.float16))[:2]
             for chunk in weight.detach().split(rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _dense_error(name: str, prefix: str, what: str) -> CheckpointError:
    return CheckpointError(f"Checkpoint entry {prefix + name!r} {what}.")


# -- 4-bit -------------------------------------------------------------------------------


class QuantLinear4bit(Linear4bit):
    """A ``bitsandbytes.nn.Linear4bit`` (nf4/fp4, optionally double-quantized).

    The weight is frozen (a ``Params4bit`` of packed 4-bit values and its
    ``QuantState``); the bias stays a normal parameter in its own dtype. The
    forward casts the input to ``compute_dtype`` and returns the input's dtype.
    """

    config: QuantConfig
    #: built from a transformers ``Conv1D``: full-precision checkpoints hold ``(in, out)``
    conv1d: bool = False

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, config: QuantConfig) -> QuantLinear4bit:
        """Quantize ``linear``'s weight into a new layer that shares its bias parameter."""
        layer = cls._empty(linear.in_features, linear.out_features, config)
        layer.weight = layer._quantize(linear.weight.detach())
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    @classmethod
    def from_conv1d(cls, conv: torch.nn.Module, config: QuantConfig) -> QuantLinear4bit:
        """Quantize a transformers ``Conv1D`` (weight ``(in, out)``) as a Linear layer with
        the transposed weight; the bias parameter is shared."""
        weight = cast(torch.Tensor, conv.weight)
        layer = cls._empty(weight.shape[0], weight.shape[1], config)
        layer.conv1d = True
        layer.weight = layer._quantize(weight.detach().t().contiguous())
        layer.bias = conv.bias
        layer.train(conv.training)
        return layer

    @classmethod
    def _empty(cls, in_features: int, out_features: int, config: QuantConfig) -> QuantLinear4bit:
        layer = cls(in_features, out_features, bias=False, compute_dtype=config.compute_dtype,
                    compress_statistics=config.double_quant, quant_type=config.quant_type,
                    quant_storage=config.quant_storage, device="meta")
        layer._configure(config)
        return layer

    def _init_bnb_attributes(self) -> None:
        """What ``Linear4bit.__init__`` sets besides the weight (for ``init_module``)."""
        self.quant_state = None

    def _configure(self, config: QuantConfig) -> None:
        self.config = config
        self.compute_dtype = config.compute_dtype
        self.compute_type_is_set = True
        self.quant_storage = config.quant_storage
        self.support_avx512bf16_for_cpu = False  # see the module docstring

    def _quantize(self, weight: torch.Tensor) -> Params4bit:
        """A ``Params4bit`` for ``weight``: quantized, or still dense when on ``meta``."""
        c = self.config
        if weight.device.type == "meta":
            param = Params4bit(weight, requires_grad=False, blocksize=c.blocksize,
                               compress_statistics=c.double_quant, quant_type=c.quant_type,
                               quant_storage=c.quant_storage, module=self)
        else:
            packed, quant_state = quantize_4bit(weight, c)
            param = Params4bit(packed, requires_grad=False, quant_state=quant_state,
                               blocksize=c.blocksize, compress_statistics=c.double_quant,
                               quant_type=c.quant_type, quant_storage=c.quant_storage,
                               module=self, bnb_quantized=True)
        self.quant_state = param.quant_state
        return param

    @property
    def packed(self) -> Params4bit:
        """The weight, typed as what it is: packed 4-bit values with their quant state."""
        return cast(Params4bit, self.weight)

    @property
    def is_quantized(self) -> bool:
        return bool(getattr(self.weight, "bnb_quantized", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized:
            raise RuntimeError(
                "This 4-bit layer holds no weights yet (it was built on the meta device); "
                "load a state dict into the model first."
            )
        quant_state = self.packed.quant_state
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = bnb.matmul_4bit(x.to(self.compute_dtype), self.weight, bias=bias,
                              quant_state=quant_state)
        return out.to(x.dtype)

    # -- memory --------------------------------------------------------------------------

    def storage_nbytes(self) -> tuple[int, int]:
        """``(per-weight bytes, constant bytes)``: packed data, block constants (and their
        nested constants), then the code books, which do not grow with the layer."""
        qs = self.packed.quant_state
        per = self.weight.data.nbytes + qs.absmax.nbytes
        const = qs.code.nbytes
        if qs.nested:
            per += qs.state2.absmax.nbytes + qs.offset.nbytes
            const += qs.state2.code.nbytes
        return per, const

    # -- checkpoints ---------------------------------------------------------------------

    def check_checkpoint(self, state: Mapping[str, Any], prefix: str) -> None:
        """Raise :class:`CheckpointError` if ``state`` cannot be loaded into this layer."""
        key = prefix + "weight"
        if key not in state:
            return
        weight = state[key]
        extra = {k[len(key) + 1:]: v for k, v in state.items() if k.startswith(key + ".")}
        shape = (self.out_features, self.in_features)
        if not extra:
            dense = _dense_shape(self)
            if not (torch.is_tensor(weight) and weight.is_floating_point()
                    and tuple(weight.shape) == dense):
                got = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
                raise _dense_error("weight", prefix, (
                    f"has shape {got} without 4-bit quant state, but the layer expects a "
                    f"floating-point weight of shape {dense}{_layout(self)} (it is quantized "
                    "on load)"))
            return
        packed = [k for k in extra if k.startswith("quant_state.bitsandbytes__")]
        if len(packed) != 1 or "absmax" not in extra:
            raise _dense_error("weight", prefix, (
                "has an incomplete 4-bit quant state (" + ", ".join(sorted(extra)) + "); save "
                "the whole state dict of the quantized model"))
        info = unpack_tensor_to_dict(extra[packed[0]])
        saved = info["quant_type"] + ("-dq" if "nested_absmax" in extra else "")
        c = self.config
        if saved != c.mode_name:
            raise _dense_error("weight", prefix, (
                f"was quantized as {saved} but the model is {c.mode_name}: wrap with mode "
                f"{saved!r} to load it, or load a full-precision checkpoint"))
        if int(info["blocksize"]) != c.blocksize:
            raise _dense_error("weight", prefix, (
                f"was quantized with blocksize {info['blocksize']} but the model uses "
                f"{c.blocksize}: build the mode with blocksize={info['blocksize']}"))
        if tuple(info["shape"]) != shape:
            raise _dense_error("weight", prefix, (
                f"holds a {tuple(info['shape'])} weight but the layer is {shape}"))

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, local_metadata: dict[str, Any],
        strict: bool, missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        stats = {k[len(key) + 1:]: v for k, v in state_dict.items() if k.startswith(key + ".")}
        on_meta = self.weight.device.type == "meta"
        if key in state_dict:
            self.check_checkpoint(state_dict, prefix)
            weight = state_dict[key].detach()
            device = weight.device if on_meta else self.weight.device
            if stats:
                stats = {k: v.detach().clone() if torch.is_tensor(v) else v
                         for k, v in stats.items()}
                param = Params4bit.from_prequantized(weight.clone(), stats, requires_grad=False,
                                                     device=device, module=self)
                param.quant_storage = self.config.quant_storage
                self.quant_state = param.quant_state
            else:
                param = self._quantize(_as_linear_weight(self, weight.to(device)))
            self._parameters["weight"] = param
        rest = {k: v for k, v in state_dict.items() if k != key and not k.startswith(key + ".")}
        metadata = dict(local_metadata)
        if on_meta:  # a layer built on meta takes the checkpoint's tensors for its bias too
            metadata["assign_to_params_buffers"] = True
        torch.nn.Module._load_from_state_dict(self, rest, prefix, metadata, strict,
                                              missing_keys, unexpected_keys, error_msgs)
        if key in state_dict and key in missing_keys:
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant={c.mode_name}, blocksize={c.blocksize}, "
                f"compute_dtype={c.compute_dtype}")


# -- int8 --------------------------------------------------------------------------------


class QuantLinear8bit(Linear8bitLt):
    """A ``bitsandbytes.nn.Linear8bitLt``: int8 weights with per-row scales (frozen),
    or trainable ``compute_dtype`` weights multiplied in int8 (``int8-training``).

    On the CPU the matmul always takes bitsandbytes' weight-only path (int8
    weights dequantized, the product in ``compute_dtype``): its int8 kernels there
    also quantize the activations and log a warning per call for non-fp16 inputs.
    """

    config: QuantConfig
    #: built from a transformers ``Conv1D``: full-precision checkpoints hold ``(in, out)``
    conv1d: bool = False

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, config: QuantConfig) -> QuantLinear8bit:
        """Convert ``linear``; the bias parameter is shared, the weight replaced."""
        layer = cls._empty(linear.in_features, linear.out_features, config)
        layer.weight = layer._quantize(linear.weight.detach(), linear.weight.requires_grad)
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    @classmethod
    def from_conv1d(cls, conv: torch.nn.Module, config: QuantConfig) -> QuantLinear8bit:
        """Quantize a transformers ``Conv1D`` (weight ``(in, out)``) as a Linear layer with
        the transposed weight (frozen int8 only); the bias parameter is shared."""
        assert not config.trainable, "int8-training leaves Conv1D layers as they are"
        weight = cast(torch.Tensor, conv.weight)
        layer = cls._empty(weight.shape[0], weight.shape[1], config)
        layer.conv1d = True
        layer.weight = layer._quantize(weight.detach().t().contiguous(), False)
        layer.bias = conv.bias
        layer.train(conv.training)
        return layer

    @classmethod
    def _empty(cls, in_features: int, out_features: int, config: QuantConfig) -> QuantLinear8bit:
        layer = cls(in_features, out_features, bias=False, has_fp16_weights=config.trainable,
                    device="meta")
        layer._configure(config)
        return layer

    def _init_bnb_attributes(self) -> None:
        """What ``Linear8bitLt.__init__`` sets besides the weight (for ``init_module``)."""
        self.state = bnb.MatmulLtState()
        self.index = None

    def _configure(self, config: QuantConfig) -> None:
        self.config = config
        self.compute_dtype = config.compute_dtype
        self.state.has_fp16_weights = config.trainable

    def _quantize(self, weight: torch.Tensor, requires_grad: bool = True) -> Int8Params:
        if self.config.trainable:
            data = weight.to(self.config.compute_dtype)
            if data.data_ptr() == weight.data_ptr() and weight.device.type != "meta":
                data = data.clone()  # never alias the source layer's weight
            return Int8Params(data, requires_grad=requires_grad, has_fp16_weights=True)
        if weight.device.type == "meta":
            return Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        return self._prequantized(*quantize_int8(weight))

    @staticmethod
    def _prequantized(cb: torch.Tensor, scb: torch.Tensor) -> Int8Params:
        param = Int8Params(cb, requires_grad=False, has_fp16_weights=False)
        param.CB, param.SCB = cb, scb
        return param

    @property
    def int8_weight(self) -> Int8Params:
        """The weight, typed as what it is: int8 values and their row scales ``SCB``."""
        return cast(Int8Params, self.weight)

    @property
    def is_quantized(self) -> bool:
        """True once the layer holds its weights: int8 values with their row scales
        (``SCB``), or for ``int8-training`` the 16-bit weights. A layer built on ``meta``
        holds none, also after ``to_empty()`` (memory, but no int8 weights or scales)
        until a state dict is loaded."""
        if self.weight.device.type == "meta":
            return False
        return self.config.trainable or getattr(self.weight, "SCB", None) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized:
            raise RuntimeError(
                "This int8 layer holds no weights yet (it was built on the meta device); "
                "load a state dict into the model first."
            )
        state = self.state
        state.is_training = self.training or x.device.type != "cuda"
        if self.config.trainable:
            state.reset_grads()  # quantize the current weights, not last step's
        else:
            state.CB, state.SCB = self.weight.data, self.int8_weight.SCB
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(self.compute_dtype)
        out = bnb.matmul(flat, self.weight, state=state)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    # -- memory --------------------------------------------------------------------------

    def storage_nbytes(self) -> tuple[int, int]:
        """``(per-weight bytes, constant bytes)``: int8 data and per-row scales."""
        if self.config.trainable:
            return self.weight.data.nbytes, 0
        return self.weight.data.nbytes + self.int8_weight.SCB.nbytes, 0

    # -- checkpoints ---------------------------------------------------------------------

    def check_checkpoint(self, state: Mapping[str, Any], prefix: str) -> None:
        """Raise :class:`CheckpointError` if ``state`` cannot be loaded into this layer."""
        key = prefix + "weight"
        if key not in state:
            return
        weight = state[key]
        shape = (self.out_features, self.in_features)
        scb = state.get(prefix + "SCB")
        expected = shape if scb is not None else _dense_shape(self)
        if not torch.is_tensor(weight) or tuple(weight.shape) != expected:
            got = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
            layout = "" if scb is not None else _layout(self)
            raise _dense_error("weight", prefix,
                               f"has shape {got} but the layer is {expected}{layout}")
        if scb is None:
            if not weight.is_floating_point():
                raise _dense_error("weight", prefix, (
                    f"is {weight.dtype} without its 'SCB' scales; save the whole state dict "
                    "of the quantized model"))
            return
        if self.config.trainable:
            raise _dense_error("weight", prefix, (
                "holds frozen int8 weights (mode int8) but int8-training keeps trainable "
                "weights: load a full-precision checkpoint, or wrap with mode 'int8'"))
        if weight.dtype is not torch.int8 or tuple(scb.shape) != (self.out_features,):
            raise _dense_error("SCB", prefix, (
                f"does not fit int8 weights of shape {shape} (weight {weight.dtype}, "
                f"scales {tuple(scb.shape)})"))

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, local_metadata: dict[str, Any],
        strict: bool, missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        key, scb_key, fmt_key = prefix + "weight", prefix + "SCB", prefix + "weight_format"
        on_meta = self.weight.device.type == "meta"
        if key in state_dict:
            self.check_checkpoint(state_dict, prefix)
            weight = state_dict[key].detach()
            device = weight.device if on_meta else self.weight.device
            if scb_key in state_dict:
                self._parameters["weight"] = self._prequantized(
                    weight.to(device).clone(), state_dict[scb_key].detach().to(device).clone())
            elif self.config.trainable and not on_meta:
                with torch.no_grad():  # in place: the optimizer keeps its entry
                    self.weight.copy_(weight)
            else:
                self._parameters["weight"] = self._quantize(
                    _as_linear_weight(self, weight.to(device)))
            self.state.reset_grads()
        rest = {k: v for k, v in state_dict.items() if k not in (key, scb_key, fmt_key)}
        metadata = dict(local_metadata)
        if on_meta:
            metadata["assign_to_params_buffers"] = True
        torch.nn.Module._load_from_state_dict(self, rest, prefix, metadata, strict,
                                              missing_keys, unexpected_keys, error_msgs)
        if key in state_dict and key in missing_keys:
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant={self.config.mode_name}, "
                f"compute_dtype={self.config.compute_dtype}")


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def _dense_shape(layer: Any) -> tuple[int, int]:
    """The shape of a full-precision weight for ``layer`` in checkpoints: ``(in, out)`` for
    a frozen layer made from a ``Conv1D`` (its model's own layout), else ``(out, in)``."""
    if layer.conv1d and not layer.config.trainable:
        return (layer.in_features, layer.out_features)
    return (layer.out_features, layer.in_features)


def _layout(layer: Any) -> str:
    return " (a transformers Conv1D's (in, out) layout)" if layer.conv1d else ""


def _as_linear_weight(layer: Any, weight: torch.Tensor) -> torch.Tensor:
    """A full-precision checkpoint weight in Linear layout ``(out, in)``."""
    if layer.conv1d and not layer.config.trainable:
        return weight.t().contiguous()
    return weight


def build_layer(source: torch.nn.Module, config: QuantConfig) -> QuantLinear4bit | QuantLinear8bit:
    """The quantized replacement of ``source``, a ``torch.nn.Linear`` or a transformers
    ``Conv1D``; the forward hooks registered on it carry over."""
    cls = QuantLinear4bit if config.kind == "4bit" else QuantLinear8bit
    if isinstance(source, TorchLinear):
        layer = cls.from_linear(source, config)
    else:
        layer = cls.from_conv1d(source, config)
    for name in _HOOK_DICTS:
        hooks = getattr(source, name, None)
        if hooks:
            getattr(layer, name).update(hooks)
    return layer


def init_layer_class(config: QuantConfig) -> type[torch.nn.Linear]:
    """A stand-in for ``torch.nn.Linear`` that builds quantized layers (``init_module``).

    Each layer is initialised like ``torch.nn.Linear`` (same RNG use, same
    values), then quantized at once unless it is on ``meta``: only one layer
    is ever held in full precision.
    """
    base = QuantLinear4bit if config.kind == "4bit" else QuantLinear8bit

    def __init__(self: Any, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        TorchLinear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        dense = self._parameters["weight"]
        self._init_bnb_attributes()
        self._configure(config)
        if config.kind == "4bit":
            self.weight = self._quantize(dense.detach())
        else:
            self.weight = self._quantize(dense.detach(), dense.requires_grad)
        created.append(self)

    created: list[torch.nn.Module] = []
    return type("Linear", (base,), {"__init__": __init__, "__module__": __name__, "created": created,
                                    "__qualname__": f"init_layer_class.<{config.mode_name}>"})
