"""fp32 master weights (Apex O2): the optimizer steps fp32 copies of 16-bit parameters."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ._tensors import check_fits
from .exceptions import WrapError

__all__ = ["MasterSet", "MasterWeights"]


class MasterWeights:
    """fp32 masters for the low-precision parameters of an optimizer.

    Built at ``wrap``: each 16-bit parameter in the optimizer's groups is
    replaced by an fp32 master (its state, if any, moves along). Gradients
    are added into the masters' fp32 gradients after each backward, so
    micro-batch accumulation happens in fp32.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        self._optimizer = optimizer
        #: each model parameter's (version counter, storage) when the masters last
        #: matched it: a change means other code wrote the parameter.
        self._seen: dict[int, tuple[int, int]] = {}
        #: gradients shown on the model by :meth:`expose_grads`: id(param) -> (grad, version)
        self._mirrors: dict[int, tuple[torch.Tensor, int]] = {}
        for group in optimizer.param_groups:
            # In place: optimizers that keep the list (L-BFGS's _params) see the masters.
            group["params"][:] = self._masters_for(group["params"])
        self.mark_synced()

    @property
    def pairs(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """(model parameter, its fp32 master) for every low-precision parameter."""
        return self._pairs

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
        self.mark_synced()
        return group

    def master_of(self, param: torch.Tensor) -> torch.nn.Parameter | None:
        """The master standing for model parameter ``param``, if it has one."""
        return next((m for p, m in self.pairs if p is param), None)

    # -- the model stays the source of truth -------------------------------------------

    def mark_synced(self) -> None:
        """Record that masters and model parameters agree now."""
        self._seen = {id(p): (p._version, p.data_ptr()) for p, _ in self.pairs}

    @torch.no_grad()
    def refresh_stale(self) -> int:
        """Take the values of model parameters that other code wrote since the masters
        last matched them (DDP's broadcast, an init function, a load into the inner
        module, an EMA swap); return how many masters were refreshed.

        A write is noticed by the parameter's version counter or a new storage; a
        write of the values the parameter already held keeps the master's fp32 digits.
        """
        refreshed = 0
        for p, m in self.pairs:
            if self._seen.get(id(p)) == (p._version, p.data_ptr()):
                continue
            if not torch.equal(p, m.to(p.dtype)):
                m.copy_(p)
                refreshed += 1
            self._seen[id(p)] = (p._version, p.data_ptr())
        return refreshed

    # -- gradients on the model ------------------------------------------------------------

    def expose_grads(self) -> None:
        """Show the masters' (unscaled, accumulated) gradients on the model's parameters,
        in their dtype, for torch utilities on ``model.parameters()``; what such code
        writes into them (clipping) is taken back by :meth:`take_grad_edits`."""
        self._mirrors = {}
        for p, m in self.pairs:
            if m.grad is None:
                continue
            p.grad = m.grad.to(p.dtype)
            self._mirrors[id(p)] = (p.grad, p.grad._version)

    def take_grad_edits(self) -> int:
        """Copy gradients that other code changed on the model into the masters; return
        how many. Called before the step."""
        edited = 0
        if not self._mirrors:
            return 0
        for p, m in self.pairs:
            shown = self._mirrors.get(id(p))
            if shown is None or p.grad is None or m.grad is None:
                continue
            grad, version = shown
            if p.grad is not grad or grad._version != version:
                m.grad.copy_(p.grad)
                edited += 1
        return edited

    def drop_exposed_grads(self) -> None:
        """Remove the gradients :meth:`expose_grads` put on the model (before a backward,
        which would otherwise add to them)."""
        for p, _ in self.pairs:
            shown = self._mirrors.get(id(p))
            if shown is not None and p.grad is shown[0]:
                p.grad = None
        self._mirrors = {}

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
    def copy_to_model(self, name_of: Callable[[torch.Tensor], str] = lambda p: "?") -> None:
        """Round the masters into the model's parameters after a step.

        :raises mixprec.exceptions.NumericsError: a master no longer fits the model's
            dtype (an fp16 weight past 65504); the model is left as it was.
        """
        if not self.pairs:
            return
        check_fits([(name_of(p), m) for p, m in self.pairs], [p.dtype for p, _ in self.pairs])
        torch._foreach_copy_([p for p, _ in self.pairs], [m for _, m in self.pairs])
        self.mark_synced()

    @torch.no_grad()
    def load_from(self, named: Mapping[str, torch.nn.Parameter], state: Mapping[str, Any]) -> None:
        """Set masters from a state dict's full-precision values (the model was loaded)."""
        by_id = {id(p): m for p, m in self.pairs}
        for name, p in named.items():
            master = by_id.get(id(p))
            if master is not None and name in state:
                master.copy_(state[name])
        self.mark_synced()

    @torch.no_grad()
    def move_to_model(self) -> None:
        """Give the model parameters the fp32 master values (for unwrap)."""
        for p, m in self.pairs:
            p.data = m.detach()


class MasterSet(MasterWeights):
    """The masters of several optimizers wrapped with one model, seen as one.

    The model's side (its state dict, loads into it, ``unwrap``) sees every master;
    each optimizer steps, unscales and diagnoses its own :class:`MasterWeights`
    (``wrap(model, [opt_a, opt_b])``, see ``_optimizers.py``).
    """

    def __init__(self, parts: Sequence[MasterWeights]) -> None:
        # Deliberately no super().__init__: every piece of state is the parts'.
        self.parts = list(parts)

    @property
    def pairs(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        return [pair for part in self.parts for pair in part.pairs]

    def add_group(self, group: dict[str, Any]) -> dict[str, Any]:
        raise WrapError("The masters of several optimizers take new groups through one "
                        "optimizer: call opt.add_param_group() on the optimizer that steps them.")

    def mark_synced(self) -> None:
        for part in self.parts:
            part.mark_synced()

    def refresh_stale(self) -> int:
        return sum(part.refresh_stale() for part in self.parts)

    def expose_grads(self) -> None:
        for part in self.parts:
            part.expose_grads()

    def take_grad_edits(self) -> int:
        return sum(part.take_grad_edits() for part in self.parts)

    def drop_exposed_grads(self) -> None:
        for part in self.parts:
            part.drop_exposed_grads()
