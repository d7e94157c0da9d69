"""Undo for ``wrap``: remember what a conversion may change, restore it on failure.

Holds references only (no tensor copies), so it costs no memory beyond keeping
the replaced tensors alive until ``wrap`` returns.
"""

from __future__ import annotations

from typing import Any

import torch


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
                g["params"] = params
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
