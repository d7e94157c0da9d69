"""8-bit, 4-bit and FP8 AdamW from ``torchao.optim``: ``ao-adamw8bit``, ``ao-adamw4bit``,
``ao-adamw-fp8``.

The user's ``torch.optim.AdamW`` (or ``Adam`` without L2 weight decay) is replaced
by torchao's low-bit AdamW holding the same parameters in the user's own group
dicts, with the hyper-parameters and any existing state carried over.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

import mixprec
from mixprec.exceptions import CheckpointError, ModeOptionError, WrapError
from mixprec.utils import check_bool, check_number

from ._deps import import_torchao

__all__ = ["KINDS", "LowBitAdamW", "state_bytes"]

#: bits -> (mode name, torchao.optim class, torchao's default block size)
KINDS: dict[str, tuple[str, str, int]] = {
    "8bit": ("ao-adamw8bit", "AdamW8bit", 256),
    "4bit": ("ao-adamw4bit", "AdamW4bit", 128),
    "fp8": ("ao-adamw-fp8", "AdamWFp8", 256),
}
_NAMES = {name: bits for bits, (name, _, _) in KINDS.items()}
#: torchao keeps fp32 state for tensors below this size (torchao/optim/adam.py, _new_buffer)
MIN_QUANTIZED_NUMEL = 4096
#: torch.optim.Adam(W) group keys that torchao's optimizers do not take
_TORCH_ONLY = ("foreach", "fused", "capturable", "differentiable", "maximize",
               "decoupled_weight_decay")
#: where torchao's optimizer-state tensor subclasses live (for portable checkpoints)
_STATE_CLASSES = {
    "OptimState8bit": "optim.subclass_8bit",
    "OptimState4bit": "optim.subclass_4bit",
    "OptimStateFp8": "optim.subclass_fp8",
}
_ENCODED = "torchao_optim_state"


class LowBitAdamW(mixprec.OptimizerMode):
    """Replace AdamW with torchao's ``AdamW8bit``, ``AdamW4bit`` or ``AdamWFp8``.

    :param bits: ``"8bit"``, ``"4bit"`` or ``"fp8"`` (or a mode name such as
        ``"ao-adamw4bit"``).
    :param block_size: elements per quantization block (torchao's default: 256 for
        8-bit and FP8, 128 for 4-bit).
    :param bf16_stochastic_round: round bf16 parameters stochastically after the
        fp32 update (torchao's option; for ``bf16-true``-style models without masters).

    Learning rates are tensors inside torchao's optimizers; LR schedulers keep
    working, and a float assigned to ``group["lr"]`` is turned back into one at the
    next step. Tensors below 4096 elements (or not a multiple of ``block_size``)
    keep fp32 state, as torchao decides.

    .. versionadded:: 0.1
    """

    def __init__(
        self, bits: str = "8bit", *, block_size: int | None = None,
        bf16_stochastic_round: bool = False,
    ) -> None:
        bits = _NAMES.get(bits, bits)
        if bits not in KINDS:
            raise ModeOptionError(f"Unknown low-bit AdamW {bits!r}; use one of {', '.join(KINDS)}.")
        self.bits = bits
        self.name, class_name, default_block = KINDS[bits]
        # FSDP2: torchao's 8-bit state steps DTensor shards (tested with two ranks); the
        # 4-bit and fp8 states are not tested there, so they are refused on FSDP2.
        self.fsdp_compatible = self.name == "ao-adamw8bit"
        if block_size is not None:
            block_size = check_number(block_size, "block_size", minimum=0, above=True,
                                      integer=True)
        if bits == "4bit" and block_size is not None and block_size % 2:
            raise ModeOptionError(
                f"block_size must be even for {self.name} (two 4-bit codes share a byte), "
                f"got {block_size}."
            )
        self.block_size = default_block if block_size is None else block_size
        self._default_block = default_block
        self.bf16_stochastic_round = check_bool(bf16_stochastic_round, "bf16_stochastic_round")
        optim = import_torchao("optim", mode=self.name)
        self._base: Any = getattr(optim, class_name)  # a torchao optimizer class

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.block_size != self._default_block:
            opts["block_size"] = self.block_size
        if self.bf16_stochastic_round:
            opts["bf16_stochastic_round"] = True
        return opts

    # -- before anything changes --------------------------------------------------------

    def validate(
        self, optimizer: torch.optim.Optimizer, module: torch.nn.Module, device: torch.device
    ) -> None:
        """Refuse optimizers whose update rule the low-bit AdamW cannot reproduce."""
        kind = type(optimizer)
        if kind not in (torch.optim.Adam, torch.optim.AdamW):
            raise WrapError(
                f"Mode {self.name!r} replaces torch.optim.AdamW (or Adam), but the optimizer is "
                f"{kind.__module__}.{kind.__qualname__}, whose update rule it cannot carry over; "
                "build the optimizer as torch.optim.AdamW(model.parameters(), ...)."
            )
        for index, group in enumerate(optimizer.param_groups):
            where = f"param group {index}"
            if group.get("maximize"):
                raise WrapError(
                    f"{where} has maximize=True, which torchao's {self._base.__name__} does not "
                    "support; minimize the negated objective instead."
                )
            if group.get("differentiable"):
                raise WrapError(
                    f"{where} has differentiable=True, which torchao's {self._base.__name__} "
                    "does not support; use a plain torch optimizer for differentiable updates."
                )
            decoupled = group.get("decoupled_weight_decay", kind is torch.optim.AdamW)
            if not decoupled and float(group["weight_decay"]) != 0.0:
                raise WrapError(
                    f"{where} applies Adam's L2 weight decay (weight_decay="
                    f"{group['weight_decay']}), but {self.name} decouples weight decay as AdamW "
                    "does, which changes training; use torch.optim.AdamW, or weight_decay=0."
                )
            if isinstance(group["lr"], torch.Tensor) and group["lr"].numel() != 1:
                raise WrapError(f"{where} has a learning-rate tensor with several elements; "
                                "use a scalar learning rate.")
        names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.is_complex():
                    raise WrapError(
                        f"Parameter {names.get(id(p), '?')!r} is {p.dtype}, which torchao's "
                        f"{self._base.__name__} would update as if it were real numbers (its "
                        f"Adam state would be wrong); drop '+{self.name}' (torch's AdamW steps "
                        "complex parameters correctly), or store the parameter as real "
                        "numbers (torch.view_as_real)."
                    )

    # -- conversion ------------------------------------------------------------------

    def convert_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        module: torch.nn.Module,
        param_names: Mapping[torch.Tensor, str],
    ) -> tuple[torch.optim.Optimizer, list[str]]:
        defaults = optimizer.defaults
        cls = _lowbit_class(self._base)
        dropped = sorted({k for g in optimizer.param_groups for k in _TORCH_ONLY
                          if k in g and g[k] not in (None, False) and k != "decoupled_weight_decay"})
        for group in optimizer.param_groups:
            _carry_group(group)
        # The user's group dicts themselves (as the core and mixprec-bnb keep them): an LR
        # scheduler built on the optimizer before wrap writes its rates into these dicts.
        new = cls(
            optimizer.param_groups,
            lr=_scalar(defaults.get("lr", 1e-3)),
            betas=tuple(_scalar(b) for b in defaults.get("betas", (0.9, 0.999))),
            eps=_scalar(defaults.get("eps", 1e-8)),
            weight_decay=_scalar(defaults.get("weight_decay", 0.0)),
            amsgrad=bool(defaults.get("amsgrad", False)),
            block_size=self.block_size,
            bf16_stochastic_round=self.bf16_stochastic_round,
        )
        carried = _carry_state(optimizer, new)
        _steps_count_for(optimizer, new)

        params = [p for g in new.param_groups for p in g["params"]]
        small = [p for p in params if not _quantized(p, self.block_size)]
        source = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
        lines = [
            f"{source} -> torchao.optim.{self._base.__name__} (block_size={self.block_size}): "
            f"{len(new.param_groups)} param group(s), {len(params)} parameters; lr, betas, "
            "eps, weight_decay, amsgrad carried",
        ]
        if small:
            names = [param_names.get(p, "?") for p in small]
            shown = ", ".join(names[:8]) + (" …" if len(names) > 8 else "")
            lines.append(
                f"fp32 state for {len(small)} tensors under {MIN_QUANTIZED_NUMEL} elements or "
                f"not a multiple of block_size {self.block_size}: {shown}"
            )
        if dropped:
            lines.append(f"not carried (torchao compiles its own fused step): {', '.join(dropped)}")
        if carried:
            lines.append(f"existing Adam state of {carried} parameters quantized into the new "
                         "optimizer")
        return new, lines


def _scalar(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _carry_group(group: dict[str, Any]) -> None:
    """Make the user's group dict one torchao steps, in place (a scheduler holding it keeps
    working): torch-only keys dropped, hyper-parameters as Python floats (torchao turns
    ``lr`` into a tensor). ``wrap`` restores the dict if it fails later."""
    for key in _TORCH_ONLY:
        group.pop(key, None)
    group["lr"] = _scalar(group["lr"])
    group["betas"] = tuple(_scalar(b) for b in group["betas"])
    group["eps"] = _scalar(group["eps"])
    group["weight_decay"] = _scalar(group["weight_decay"])


def _steps_count_for(user: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Each step of ``new`` counts as a step of the user's optimizer it replaces.

    An LR scheduler built on the user's optimizer before ``wrap`` wraps that object's
    ``step`` to note that it ran (torch's ``_opt_called``) and otherwise warns
    "lr_scheduler.step() before optimizer.step()" in a correct loop. A weak reference:
    the user's optimizer is not kept alive for this.
    """
    ref = weakref.ref(user)

    def mark(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        target = ref()
        if target is not None:
            target._opt_called = True  # type: ignore[attr-defined]

    new.register_step_post_hook(mark)


def _quantized(p: torch.Tensor, block_size: int) -> bool:
    return p.numel() >= MIN_QUANTIZED_NUMEL and p.numel() % block_size == 0


def _carry_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> int:
    """Quantize the Adam state the old optimizer already has into the new one."""
    carried = 0
    for group in new.param_groups:
        for p in group["params"]:
            state = old.state.get(p)
            if not state:
                continue
            out: dict[str, Any] = {"step": torch.tensor(_scalar(state.get("step", 0.0)))}
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False), ("max_exp_avg_sq", False)):
                if key in state:
                    # _new_buffer is torchao's own choice between quantized and fp32 state
                    buffer = new._new_buffer(p, signed)  # type: ignore[attr-defined]
                    buffer.copy_(state[key].to(torch.float32))
                    out[key] = buffer
            if group.get("amsgrad") and "max_exp_avg_sq" not in out:
                buffer = new._new_buffer(p, False)  # type: ignore[attr-defined]
                buffer.copy_(state["exp_avg_sq"].to(torch.float32))
                out["max_exp_avg_sq"] = buffer
            new.state[p] = out
            carried += 1
    return carried


# -- the optimizer classes: torchao's, with portable checkpoints --------------------------


class _PortableCheckpoints:
    """Mixin for torchao's low-bit optimizers.

    * ``state_dict()`` stores each quantized state tensor as its plain parts
      (codes, scales, lookup table) in a small dict, so a checkpoint loads with
      ``torch.load(weights_only=True)`` before torchao is even imported, and torch's
      own ``load_state_dict`` never casts FP8 codes or fp32 scales to the parameter
      dtype.
    * ``step()`` turns a float learning rate (``group["lr"] = 1e-4``) back into the
      tensor torchao's compiled step needs, instead of failing.
    """

    param_groups: list[dict[str, Any]]
    state: Any

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        for group in self.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(_scalar(group["lr"]), dtype=torch.float32)
        return super().step(closure)  # type: ignore[misc]

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()  # type: ignore[misc]
        sd["state"] = {pid: {k: _encode(v) for k, v in s.items()} for pid, s in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        packed = state_dict.get("state", {})
        plain = {pid: {k: v for k, v in s.items() if not _is_encoded(v)}
                 for pid, s in packed.items()}
        super().load_state_dict({**state_dict, "state": plain})  # type: ignore[misc]
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(saved_ids, params))
        for pid, s in packed.items():
            for key, value in s.items():
                if _is_encoded(value):
                    p = by_id[pid]
                    self.state[p][key] = _decode(value, p)


@functools.cache
def _lowbit_class(base: Any) -> Any:
    return type(base.__name__, (_PortableCheckpoints, base), {
        "__module__": __name__,
        "__doc__": f"torchao.optim.{base.__name__} with portable checkpoints (mixprec-torchao).",
    })


def _is_encoded(value: Any) -> bool:
    return isinstance(value, dict) and _ENCODED in value


def _encode(value: Any) -> Any:
    name = type(value).__name__
    if not isinstance(value, torch.Tensor) or name not in _STATE_CLASSES:
        return value
    names, attributes = value.__tensor_flatten__()  # type: ignore[attr-defined]
    return {
        _ENCODED: name,
        "tensors": {n: getattr(value, n) for n in names},
        "attributes": [tuple(a) if isinstance(a, torch.Size) else a for a in attributes],
    }


def _decode(value: Mapping[str, Any], param: torch.Tensor) -> torch.Tensor:
    name = value[_ENCODED]
    if name not in _STATE_CLASSES:
        raise CheckpointError(
            f"The checkpoint holds optimizer state of unknown kind {name!r}; it was written by "
            "a newer mixprec-torchao: upgrade it."
        )
    module = import_torchao(_STATE_CLASSES[name], mode="low-bit AdamW checkpoint")
    cls = getattr(module, name)
    tensors = {k: t.to(param.device) for k, t in value["tensors"].items()}
    return cls.__tensor_unflatten__(tensors, list(value["attributes"]), None, None)


def state_bytes(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None
) -> int:
    """Bytes held by an optimizer's per-parameter state, counted from the tensors.

    Quantized torchao state counts its parts (codes, block scales, lookup table);
    every other tensor its ``numel() * element_size()``. Works on a wrapped optimizer.

    :param params: count only these parameters' state (default: all).

    .. versionadded:: 0.1
    """
    states = (optimizer.state.values() if params is None
              else (optimizer.state[p] for p in params if p in optimizer.state))
    return sum(_tensor_bytes(v) for s in states for v in s.values())


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if not isinstance(value, torch.Tensor):
        return 0
    if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(value, n)) for n in names)
    return value.numel() * value.element_size()
