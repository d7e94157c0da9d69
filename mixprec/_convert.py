"""Converting a model (and its optimizer) for a mode, all or nothing.

The sequence ``wrap`` and ``mixprec.distributed.fully_shard`` share: validate
everything first (:func:`validate_modes`), then convert inside :func:`atomic`,
whose :class:`Journal` puts every module, parameter and optimizer entry back if
a step fails half way; :func:`convert_module` and :func:`remap_optimizer` are the
steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ._interface import OptimizerMode, PrecisionMode
from ._tensors import cast_floating, device_of
from .exceptions import WrapError

__all__ = ["Journal", "atomic", "convert_module", "match_state_dtypes", "remap_optimizer",
           "validate_modes"]


def validate_modes(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
    precision: PrecisionMode, optimizer_modes: Sequence[OptimizerMode],
) -> torch.device:
    """Every mode's checks, before anything changes; returns the model's device."""
    device = device_of(model)
    precision.validate(model, device)
    for om in optimizer_modes:
        if optimizer is None:
            raise WrapError(
                f"Optimizer mode {om.name!r} needs an optimizer: call wrap(model, optimizer)."
            )
        om.validate(optimizer, model, device)
    return device


@contextlib.contextmanager
def atomic(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[Journal]:
    """Changes made to ``model`` and ``optimizer`` in the block are undone if it raises."""
    journal = Journal(model, optimizer)
    try:
        yield journal
    except BaseException:
        journal.rollback()
        raise


def convert_module(
    precision: PrecisionMode, model: torch.nn.Module, storage_dtype: torch.dtype | None = None,
) -> tuple[list[str], dict[int, list[str]]]:
    """Run the mode's ``convert_module``; return the summary lines and the parameters'
    names before it (by ``id``), for :func:`remap_optimizer`.

    :param storage_dtype: cast floating-point parameters to this afterwards (FSDP2 plans).
    """
    names_before: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_before.setdefault(id(p), []).append(name)
    lines = [f"mode: {precision.describe()}", *precision.convert_module(model)]
    if storage_dtype is not None:
        n, _ = cast_floating(model, storage_dtype, buffers=False)
        if n:
            lines.append(f"sharded parameters kept in {storage_dtype} ({n} cast): they are "
                         "what the optimizer steps")
    return lines, names_before


class Journal:
    """Snapshot of a module tree and an optimizer, restorable in place."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self._modules: list[tuple[torch.nn.Module, type, dict[str, tuple[Any, Any]]]] = []
        self._params: dict[int, tuple[Any, torch.Tensor, bool, torch.Tensor | None]] = {}
        for m in module.modules():
            self._modules.append((m, type(m), _snapshot_dict(m.__dict__)))
            for p in m._parameters.values():
                if p is not None and id(p) not in self._params:
                    self._params[id(p)] = (p, p.data, p.requires_grad, p.grad)
        self._optimizer = optimizer
        if optimizer is not None:
            self._groups = [(g, dict(g), list(g["params"])) for g in optimizer.param_groups]
            self._group_list = list(optimizer.param_groups)
            self._state = {p: dict(s) for p, s in optimizer.state.items()}
            for g in optimizer.param_groups:
                for p in g["params"]:
                    if id(p) not in self._params:
                        self._params[id(p)] = (p, p.data, p.requires_grad, p.grad)

    def rollback(self) -> None:
        """Put every recorded module, parameter and optimizer entry back."""
        for m, cls, saved in self._modules:
            if type(m) is not cls:
                m.__class__ = cls
            _restore_dict(m.__dict__, saved)
        for p, data, requires_grad, grad in self._params.values():
            p.grad = None
            p.data = data
            p.requires_grad_(requires_grad)
            p.grad = grad
        opt = self._optimizer
        if opt is not None:
            opt.param_groups[:] = self._group_list
            for g, saved_group, params in self._groups:
                g.clear()
                g.update(saved_group)
                g["params"][:] = params  # the same list object, as optimizers may keep it
            opt.state.clear()
            for p, s in self._state.items():
                opt.state[p] = s


def _snapshot_dict(d: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Each attribute with, for dicts and sets (parameters, hooks, …), a copy of its content."""
    out: dict[str, tuple[Any, Any]] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out[key] = (value, dict(value))
        elif isinstance(value, set):
            out[key] = (value, set(value))
        else:
            out[key] = (value, None)
    return out


def _restore_dict(d: dict[str, Any], saved: dict[str, tuple[Any, Any]]) -> None:
    for key in [k for k in d if k not in saved]:
        del d[key]
    for key, (value, content) in saved.items():
        if content is not None:  # same object as before, same content
            value.clear()
            value.update(content)
        d[key] = value


def remap_optimizer(
    optimizer: torch.optim.Optimizer, names_before: dict[int, list[str]],
    names_after: dict[str, torch.nn.Parameter],
) -> list[str]:
    """Point the optimizer at the converted model's parameters.

    A parameter still in the model stays; one replaced at the same name by a
    trainable tensor is swapped for it (state moved); one that left the model or
    was frozen leaves the optimizer with its state.
    """
    live = {id(p) for p in names_after.values()}
    replaced, dropped = 0, []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if id(p) in live and p.requires_grad:
                params.append(p)
                continue
            new = None if id(p) in live else next(
                (names_after[n] for n in names_before.get(id(p), []) if n in names_after), None)
            state = optimizer.state.pop(p, None)
            if new is not None and new.requires_grad:
                params.append(new)
                if state:
                    optimizer.state[new] = {
                        k: v.to(new.dtype) if torch.is_tensor(v) and v.is_floating_point()
                        and v.shape == new.shape else v for k, v in state.items()
                    }
                replaced += 1
            else:
                dropped.append(names_before.get(id(p), ["?"])[0])
        group["params"][:] = params  # in place: L-BFGS keeps the list as _params
    lines = []
    if replaced:
        lines.append(f"optimizer: {replaced} parameters remapped to their converted tensors")
    if dropped:
        shown = ", ".join(dropped[:8]) + (" …" if len(dropped) > 8 else "")
        lines.append(f"optimizer: {len(dropped)} frozen or removed parameters left it: {shown}")
    return lines


def match_state_dtypes(optimizer: torch.optim.Optimizer) -> None:
    """Cast existing optimizer state to the dtype its parameter now steps in.

    A parameter cast in place (``bf16-true``) keeps its optimizer entry, and torch
    optimizers fail on fp32 state for a bf16 parameter. ``step`` counters stay as
    they are (bf16 cannot count past 256).
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if (key != "step" and torch.is_tensor(value) and value.is_floating_point()
                        and value.shape == p.shape and value.dtype is not p.dtype):
                    state[key] = value.to(p.dtype)
