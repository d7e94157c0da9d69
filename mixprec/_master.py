"""fp32 master weights (Apex O2): the optimizer steps fp32 copies of 16-bit parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["MasterWeights"]


class MasterWeights:
    """fp32 masters for the low-precision parameters of an optimizer.

    Built at ``wrap``: each 16-bit parameter in the optimizer's groups is
    replaced by an fp32 master (its state, if any, moves along). Gradients
    are added into the masters' fp32 gradients after each backward, so
    micro-batch accumulation happens in fp32.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        self._optimizer = optimizer
        for group in optimizer.param_groups:
            group["params"] = self._masters_for(group["params"])

    def _masters_for(self, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        out = []
        for p in params:
            if not p.is_floating_point() or p.dtype in (torch.float32, torch.float64):
                out.append(p)
                continue
            master = torch.nn.Parameter(p.detach().to(torch.float32), requires_grad=True)
            state = self._optimizer.state.pop(p, None)
            if state:
                self._optimizer.state[master] = {
                    k: v.to(torch.float32) if torch.is_tensor(v) and v.is_floating_point()
                    and v.shape == master.shape else v for k, v in state.items()
                }
            self.pairs.append((p, master))
            out.append(master)
        return out

    def add_group(self, group: dict[str, Any]) -> dict[str, Any]:
        group = dict(group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group["params"] = self._masters_for(params)
        return group

    def describe(self) -> str:
        n = sum(m.numel() for _, m in self.pairs)
        return f"fp32 master weights: {len(self.pairs)} parameters ({n} elements) in the optimizer"

    def accumulate_grads(self) -> None:
        """Move model gradients into the masters' fp32 gradients (adding)."""
        for p, m in self.pairs:
            g = p.grad
            if g is None:
                continue
            if m.grad is None:
                m.grad = g.to(torch.float32)
            else:
                m.grad.add_(g)
            p.grad = None

    def model_has_grads(self) -> bool:
        return any(p.grad is not None for p, _ in self.pairs)

    def zero_model_grads(self, set_to_none: bool) -> None:
        for p, _ in self.pairs:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round the masters into the model's parameters after a step."""
        if not self.pairs:
            return
        torch._foreach_copy_([p for p, _ in self.pairs], [m for _, m in self.pairs])

    @torch.no_grad()
    def load_from(self, named: Mapping[str, torch.nn.Parameter], state: Mapping[str, Any]) -> None:
        """Set masters from a state dict's full-precision values (the model was loaded)."""
        by_id = {id(p): m for p, m in self.pairs}
        for name, p in named.items():
            master = by_id.get(id(p))
            if master is not None and name in state:
                master.copy_(state[name])

    @torch.no_grad()
    def move_to_model(self) -> None:
        """Give the model parameters the fp32 master values (for unwrap)."""
        for p, m in self.pairs:
            p.data = m.detach()
