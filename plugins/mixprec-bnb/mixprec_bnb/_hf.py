"""Hugging Face models under the bitsandbytes modes: the output layer, GPT-2's
``Conv1D``, layers transformers already quantized, and the ``quantization_config``
that ``save_pretrained`` writes so that ``from_pretrained`` loads the model quantized.

Nothing here imports transformers or peft: a model that uses them has imported them
already, so their classes are looked up in ``sys.modules``.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from typing import Any, cast

import torch

from mixprec.utils import match_module

from ._layers import QuantConfig, QuantLinear8bit, TorchLinear

__all__ = ["attach_quantization_config", "conv1d_class", "foreign_config", "output_layer_names",
           "scales"]


def conv1d_class() -> type[torch.nn.Module] | None:
    """transformers' ``Conv1D`` (GPT-2 family: weight ``(in, out)``), if it is imported."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _pretrained_model_class() -> type[torch.nn.Module] | None:
    return getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)


def output_layer_names(module: torch.nn.Module) -> list[str]:
    """Dotted names of the model's output layer (the ``lm_head``).

    The module ``module.get_output_embeddings()`` returns where the model has that
    method and it returns a module (transformers models, and peft models through
    them); otherwise every module named ``lm_head`` or ``….lm_head`` (peft's
    ``base_model.model.lm_head``).
    """
    named = list(module.named_modules(remove_duplicate=False))
    get = getattr(module, "get_output_embeddings", None)
    head = None
    if callable(get):
        try:
            head = get()
        except (AttributeError, NotImplementedError):  # models without an output layer
            head = None
    if isinstance(head, torch.nn.Module):
        names = [name for name, sub in named if sub is head and name]
        if names:
            return names
    return [name for name, _ in named if name == "lm_head" or name.endswith(".lm_head")]


def keep_in_fp32_names(module: torch.nn.Module) -> list[str]:
    """Dotted names of the modules a transformers model keeps in fp32
    (``_keep_in_fp32_modules``, such as T5's ``wo``), which transformers' bitsandbytes
    loading never quantizes; the patterns are matched by :func:`mixprec.utils.match_module`
    against the names inside each model."""
    pretrained = _pretrained_model_class()
    if pretrained is None:
        return []
    named = list(module.named_modules(remove_duplicate=False))
    found: list[str] = []
    for prefix, model in named:
        patterns = tuple(sorted(getattr(model, "_keep_in_fp32_modules", None) or ()))
        if not isinstance(model, pretrained) or not patterns:
            continue
        start = f"{prefix}." if prefix else ""
        found += [name for name, _ in named if name.startswith(start)
                  and match_module(name[len(start):], patterns)]
    return found


def inside(name: str, parents: Iterable[str]) -> bool:
    """True if module ``name`` is one of ``parents`` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in parents)


def foreign_config(layer: torch.nn.Module, compute_dtype: torch.dtype) -> QuantConfig | None:
    """What a bitsandbytes ``Linear4bit``/``Linear8bitLt`` not made by mixprec (one that
    transformers' ``BitsAndBytesConfig`` loading built) holds, as a :class:`QuantConfig`
    computing in ``compute_dtype``; None if its weight is not quantized (on ``meta``, or
    an ``Linear8bitLt`` with trainable 16-bit weights)."""
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    weight = cast(torch.Tensor, layer.weight)
    if isinstance(layer, Linear4bit):
        qs = getattr(weight, "quant_state", None)
        if qs is None or not getattr(weight, "bnb_quantized", False):
            return None
        return QuantConfig(kind="4bit", quant_type=qs.quant_type, double_quant=bool(qs.nested),
                           blocksize=int(qs.blocksize), quant_storage=weight.dtype,
                           compute_dtype=compute_dtype)
    if isinstance(layer, Linear8bitLt):
        if layer.state.has_fp16_weights or weight.dtype is not torch.int8 or scales(layer) is None:
            return None
        return QuantConfig(kind="int8", quant_type="int8", compute_dtype=compute_dtype)
    return None


def scales(layer: Any) -> torch.Tensor | None:
    """The row scales of a bitsandbytes ``Linear8bitLt``: on its weight until its first
    forward, on its matmul state after."""
    found = getattr(layer.weight, "SCB", None)
    return layer.state.SCB if found is None else found


def attach_quantization_config(
    root: torch.nn.Module, config: QuantConfig, quantized: set[int], adapters: set[int],
) -> list[str]:
    """Give each transformers model in ``root`` a ``config.quantization_config`` that
    describes its quantized layers, so that ``save_pretrained`` writes a checkpoint
    ``from_pretrained`` loads quantized; return summary lines.

    ``llm_int8_skip_modules`` lists every ``nn.Linear``/``Conv1D`` left in full precision
    (peft adapters aside), so transformers quantizes exactly the layers mixprec did and
    adds none of its defaults. The model gets a copy of its config (every module that
    held the old one holds the copy), so the caller's config object is not changed and
    a failed ``wrap`` restores the old one with the modules.

    :param quantized: ids of the quantized layers.
    :param adapters: ids of peft adapter modules (never listed).
    """
    pretrained = _pretrained_model_class()
    if pretrained is None or config.trainable:
        return []  # int8-training: the weights are plain 16-bit tensors, saved as such
    from transformers import BitsAndBytesConfig

    conv1d = conv1d_class()
    named = list(root.named_modules(remove_duplicate=False))
    lines: list[str] = []
    done: set[int] = set()
    for prefix, model in named:
        old = getattr(model, "config", None)
        if not isinstance(model, pretrained) or old is None or id(old) in done:
            continue
        done.add(id(old))
        existing = getattr(old, "quantization_config", None)
        method = (existing.get("quant_method") if isinstance(existing, dict)
                  else getattr(existing, "quant_method", None))
        if existing is not None and str(getattr(method, "value", method)) != "bitsandbytes":
            lines.append(f"transformers: {prefix or 'the model'} keeps its quantization_config "
                         f"({method}); save_pretrained does not describe the bitsandbytes layers")
            continue
        start = f"{prefix}." if prefix else ""
        skip, threshold = set(), 0.0
        for name, sub in named:
            if not name.startswith(start) or id(sub) in adapters:
                continue
            if id(sub) in quantized:
                if isinstance(sub, QuantLinear8bit):
                    threshold = max(threshold, float(sub.state.threshold))
            elif type(sub) is TorchLinear or (conv1d is not None and type(sub) is conv1d):
                skip.add(name[len(start):])
        if config.kind == "4bit":
            bnb_config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=config.quant_type,
                bnb_4bit_use_double_quant=config.double_quant,
                bnb_4bit_compute_dtype=config.compute_dtype,
                bnb_4bit_quant_storage=config.quant_storage, llm_int8_skip_modules=sorted(skip))
        else:
            bnb_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold,
                                            llm_int8_skip_modules=sorted(skip))
        new = copy.deepcopy(old)
        new.quantization_config = bnb_config
        done.add(id(new))  # the inner models that shared the old config share this one
        for _, sub in named:
            if sub.__dict__.get("config") is old:
                sub.__dict__["config"] = new
        kept = ", ".join(sorted(skip)) or "none"
        lines.append(f"transformers: {prefix or 'the model'}'s config.quantization_config "
                     f"describes the {config.mode_name} layers (llm_int8_skip_modules: {kept}): "
                     "save_pretrained writes a checkpoint from_pretrained loads quantized")
    return lines


def describe_foreign(layer: Any) -> str:
    """``"Linear4bit (nf4-dq, blocksize 64)"`` for error messages."""
    from bitsandbytes.nn import Linear4bit

    kind = type(layer).__name__
    if isinstance(layer, Linear4bit):
        qs = getattr(layer.weight, "quant_state", None)
        if qs is not None:
            return (f"{kind} ({qs.quant_type}{'-dq' if qs.nested else ''}, "
                    f"blocksize {qs.blocksize})")
    return kind
