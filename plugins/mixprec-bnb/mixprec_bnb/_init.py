"""``init_module`` for the quantized modes: build Linear layers already quantized.

Inside the context ``torch.nn.Linear`` builds quantized layers: each one is
initialised like ``torch.nn.Linear`` and quantized at once (on ``meta`` it stays
empty and is quantized when a state dict is loaded), so the model never exists
in full precision. A layer's dotted name is only known once the whole model
is assembled, so ``ignore_modules`` is applied when the context exits: the
excluded layers are replaced by plain ``torch.nn.Linear`` layers (freshly
initialised, or empty on ``meta``). So is the model's output layer (``lm_head``),
which the modes keep in full precision unless ``quantize_lm_head=True``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mixprec.utils import match_module, unmatched_patterns, warn_user

from ._layers import QuantConfig, TorchLinear, init_layer_class, is_quantized_layer

__all__ = ["quantized_init"]

logger = logging.getLogger("mixprec")


class _Tracker:
    """Remembers which module every module was registered into during the context."""

    def __init__(self, layer_class: type) -> None:
        self.layer_class = layer_class
        self.layers: list[Any] = layer_class.created  # type: ignore[attr-defined]
        self.parents: dict[int, torch.nn.Module] = {}

    def on_register(self, module: torch.nn.Module, name: str,
                    submodule: torch.nn.Module | None) -> None:
        if submodule is not None:
            self.parents[id(submodule)] = module

    def roots(self) -> list[torch.nn.Module]:
        roots: list[torch.nn.Module] = []
        for layer in self.layers:
            node = layer
            seen = {id(node)}
            while id(node) in self.parents and id(self.parents[id(node)]) not in seen:
                node = self.parents[id(node)]
                seen.add(id(node))
            if not any(r is node for r in roots):
                roots.append(node)
        return roots


@contextlib.contextmanager
def quantized_init(
    config: QuantConfig, ignore_modules: Sequence[str], device: torch.device | str | None,
    *, quantize_lm_head: bool = False,
) -> Iterator[None]:
    """Replace ``torch.nn.Linear`` by quantizing layers inside the block (not thread-safe)."""
    layer_class = init_layer_class(config)
    tracker = _Tracker(layer_class)
    previous = torch.nn.Linear
    handle = torch.nn.modules.module.register_module_module_registration_hook(
        tracker.on_register)
    torch.nn.Linear = layer_class  # type: ignore[misc]
    try:
        with contextlib.ExitStack() as stack:
            if device is not None:
                stack.enter_context(torch.device(device))
            yield
    finally:
        torch.nn.Linear = previous  # type: ignore[misc]
        handle.remove()
    _finish(tracker, ignore_modules, config, quantize_lm_head)


def _finish(tracker: _Tracker, ignore_modules: Sequence[str], config: QuantConfig,
            quantize_lm_head: bool) -> None:
    from ._hf import inside, keep_in_fp32_names, output_layer_names

    base = layer_base(config)
    roots = tracker.roots()
    excluded: list[str] = []
    names: list[str] = []
    for root in roots:
        heads = [] if quantize_lm_head else output_layer_names(root)
        heads += keep_in_fp32_names(root)
        for name, module in list(root.named_modules(remove_duplicate=False)):
            names.append(name)
            pattern = match_module(name, ignore_modules)
            if type(module) is not tracker.layer_class or (pattern is None
                                                           and not inside(name, heads)):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = root.get_submodule(parent_name)
            parent._modules[attr] = _plain_linear(module)
            excluded.append(name)
    for layer in tracker.layers:
        if type(layer) is tracker.layer_class:
            layer.__class__ = base  # plain class: picklable, no trace of the context
    unmatched = sorted(set(unmatched_patterns(names, ignore_modules)))
    if unmatched and tracker.layers:
        warn_user(
            f"ignore_modules {unmatched} matched no module built in init_module, so every "
            "Linear layer was quantized; check the names against model.named_modules()."
        )
    quantized = sum(1 for layer in tracker.layers if is_quantized_layer(layer)) - len(excluded)
    tracker.layers.clear()
    logger.info("mixprec: init_module built %d %s Linear layers%s", quantized, config.mode_name,
                f"; left in full precision: {', '.join(excluded)}" if excluded else "")


def layer_base(config: QuantConfig) -> type[torch.nn.Module]:
    from ._layers import QuantLinear4bit, QuantLinear8bit

    return QuantLinear4bit if config.kind == "4bit" else QuantLinear8bit


def _plain_linear(layer: Any) -> torch.nn.Linear:
    """A full-precision ``torch.nn.Linear`` in place of an excluded quantized one."""
    device = layer.weight.device
    bias = layer.bias
    plain = TorchLinear(layer.in_features, layer.out_features, bias=bias is not None,
                        device=device)
    if bias is not None:
        plain.bias = bias  # the bias was never quantized: keep its values
    plain.train(layer.training)
    return plain
