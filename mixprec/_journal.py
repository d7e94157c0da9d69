"""Undo for ``wrap``: remember what a conversion may change, restore it on failure.

Holds references only (no tensor copies), so it costs no memory beyond keeping
the replaced tensors alive until ``wrap`` returns.
"""

from __future__ import annotations

from typing import Any

import torch

_MODULE_DICTS = ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks",
                 "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")


class Journal:
    """Snapshot of a module tree and an optimizer, restorable in place."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self._modules: list[tuple[torch.nn.Module, type, bool, dict[str, dict[Any, Any]]]] = []
        self._params: dict[int, tuple[Any, torch.Tensor, bool, torch.Tensor | None]] = {}
        for m in module.modules():
            dicts = {k: dict(getattr(m, k)) for k in _MODULE_DICTS if hasattr(m, k)}
            self._modules.append((m, type(m), m.training, dicts))
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
        for m, cls, training, dicts in self._modules:
            if type(m) is not cls:
                m.__class__ = cls
            m.training = training
            for key, saved in dicts.items():
                live = getattr(m, key)
                live.clear()
                live.update(saved)
        for p, data, requires_grad, grad in self._params.values():
            p.grad = None
            p.data = data
            p.requires_grad_(requires_grad)
            p.grad = grad
        opt = self._optimizer
        if opt is not None:
            opt.param_groups[:] = self._group_list
            for g, saved, params in self._groups:
                g.clear()
                g.update(saved)
                g["params"] = params
            opt.state.clear()
            for p, s in self._state.items():
                opt.state[p] = s
