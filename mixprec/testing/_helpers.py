"""Helpers of the conformance kit (:mod:`mixprec.testing`): snapshots of a
model and optimizer with a readable diff, the default model and data, and
the entry-point import probe.

Uses only mixprec's public API, torch and the standard library, like any
plugin's tests would. (PYTEST_DONT_REWRITE: the kit raises its own messages.)
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

import mixprec

__all__ = [
    "ConformanceNet",
    "Snapshot",
    "all_finite",
    "entry_point_imports",
    "float_tensors",
    "nested_differences",
    "requirement_modules",
]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


# -- the default model and data ------------------------------------------------------------


class ConformanceNet(torch.nn.Module):
    """The small model the checks wrap unless a test class sets ``model_factory``.

    Two ``nn.Linear`` layers with dimensions divisible by 16 (FP8 and quantized
    kernels take them), a ``LayerNorm`` and a float buffer. Input and output:
    ``(batch, features)`` float tensors.
    """

    def __init__(self, features: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(features, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.fc2 = torch.nn.Linear(hidden, features)
        # in the default dtype, like the layers: init_module builds it in the mode's
        self.register_buffer("out_scale", torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x)))) * self.out_scale


@functools.lru_cache(maxsize=4)
def _teacher(features: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(features, features, generator=g, dtype=torch.float32) / features**0.5


def default_batch(index: int, batch_size: int, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and a learnable target (``tanh`` of a fixed linear map), cycling over 4 batches."""
    g = torch.Generator().manual_seed(index % 4)
    x = torch.randn(batch_size, features, generator=g, dtype=torch.float32)
    return x, torch.tanh(x @ _teacher(features))


def float_tensors(data: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in nested data (tuples, lists, dicts, dataclasses)."""
    found: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        found.append(t)
        return t

    mixprec.apply_to_float_tensors(data, keep)
    return found


def _tensors_in(data: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(data, torch.Tensor):
        yield path, data
    elif isinstance(data, Mapping):
        for k, v in data.items():
            yield from _tensors_in(v, f"{path}.{k}" if path else str(k))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            yield from _tensors_in(v, f"{path}[{i}]")


def all_finite(data: Any) -> list[str]:
    """Paths of floating-point tensors in nested data that hold inf or NaN."""
    return [path for path, t in _tensors_in(data)
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def clone_nested(data: Any) -> Any:
    """A copy of nested data with every tensor cloned."""
    if isinstance(data, torch.Tensor):
        return data.detach().clone()
    if isinstance(data, Mapping):
        return {k: clone_nested(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [clone_nested(v) for v in data]
    return data


def nested_differences(
    expected: Any, got: Any, path: str = "", *, exact: bool = True,
    rtol: float = 0.0, atol: float = 0.0,
) -> list[str]:
    """Where two nested structures of tensors and plain values differ."""
    where = path or "<root>"
    if isinstance(expected, torch.Tensor) or isinstance(got, torch.Tensor):
        if not (isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor)):
            return [f"{where}: {type(got).__name__} instead of {type(expected).__name__}"]
        if expected.dtype != got.dtype or expected.shape != got.shape:
            return [f"{where}: {got.dtype}{tuple(got.shape)} instead of "
                    f"{expected.dtype}{tuple(expected.shape)}"]
        if exact or not expected.is_floating_point():
            same = torch.equal(expected.cpu(), got.cpu())
        else:
            same = torch.allclose(got.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)
        if same:
            return []
        if expected.is_floating_point():
            diff = (got.double() - expected.double()).abs().max().item()
            return [f"{where}: values differ (largest difference {diff:.3g})"]
        return [f"{where}: values differ"]
    if isinstance(expected, Mapping) and isinstance(got, Mapping):
        out = []
        if set(expected) != set(got):
            missing = sorted(map(str, set(expected) - set(got)))
            extra = sorted(map(str, set(got) - set(expected)))
            out.append(f"{where}: keys differ (missing {missing}, unexpected {extra})")
        for k in expected:
            if k in got:
                sub = f"{path}.{k}" if path else str(k)
                out += nested_differences(expected[k], got[k], sub, exact=exact, rtol=rtol, atol=atol)
        return out
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        if len(expected) != len(got):
            return [f"{where}: {len(got)} items instead of {len(expected)}"]
        out = []
        for i, (a, b) in enumerate(zip(expected, got)):
            out += nested_differences(a, b, f"{path}[{i}]", exact=exact, rtol=rtol, atol=atol)
        return out
    if expected != got and not (isinstance(expected, float) and isinstance(got, float)
                                and expected != expected and got != got):  # NaN == NaN here
        return [f"{where}: {got!r} instead of {expected!r}"]
    return []


# -- snapshots of a model and an optimizer -------------------------------------------------

_HOOK_DICT_RE = re.compile(r"^_.*(hooks|hooks_with_kwargs|hooks_always_called)$")


@dataclass
class _ParamRecord:
    obj: torch.Tensor
    value: torch.Tensor
    requires_grad: bool
    grad: torch.Tensor | None


@dataclass
class Snapshot:
    """Everything a failed ``wrap`` must leave as it was: module tree (objects,
    classes, attributes, hooks), parameters (objects, values, dtypes, devices,
    ``requires_grad``, gradients), buffers, state-dict keys, optimizer groups
    and state."""

    modules: dict[str, tuple[torch.nn.Module, type, bool, frozenset[str], dict[str, tuple[Any, ...]]]]
    params: dict[str, _ParamRecord]
    buffers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    state_keys: list[str]
    groups: list[tuple[dict[str, Any], dict[str, Any], list[int]]]
    state: dict[int, dict[str, Any]]
    names: dict[int, str]

    @classmethod
    def take(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> Snapshot:
        modules = {}
        for name, m in model.named_modules(remove_duplicate=False):
            hooks = {k: tuple(v) for k, v in vars(m).items()
                     if _HOOK_DICT_RE.match(k) and isinstance(v, (dict, set))}
            hooks["_non_persistent_buffers_set"] = tuple(sorted(m._non_persistent_buffers_set))
            modules[name or "<root>"] = (m, type(m), m.training, frozenset(vars(m)), hooks)
        params = {
            n: _ParamRecord(p, p.detach().clone(), p.requires_grad,
                            None if p.grad is None else p.grad.detach().clone())
            for n, p in model.named_parameters(remove_duplicate=False)
        }
        buffers = {n: (b, b.detach().clone()) for n, b in model.named_buffers(remove_duplicate=False)}
        names = {id(p): n for n, p in model.named_parameters()}
        groups, state = [], {}
        if optimizer is not None:
            groups = [(g, {k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]])
                      for g in optimizer.param_groups]
            state = {id(p): clone_nested(dict(s)) for p, s in optimizer.state.items()}
        return cls(modules, params, buffers, list(model.state_dict()), groups, state, names)

    def differences(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> list[str]:
        """What changed since the snapshot, one line per finding."""
        out: list[str] = []
        now_modules = {n or "<root>": m for n, m in model.named_modules(remove_duplicate=False)}
        for name in self.modules.keys() - now_modules.keys():
            out.append(f"module {name!r} is gone from the tree")
        for name in now_modules.keys() - self.modules.keys():
            out.append(f"module {name!r} was added to the tree")
        for name, (obj, cls, training, attrs, hooks) in self.modules.items():
            m = now_modules.get(name)
            if m is None:
                continue
            if m is not obj:
                out.append(f"module {name!r} is a different object ({type(m).__name__}, was "
                           f"{cls.__name__})")
                continue
            if type(m) is not cls:
                out.append(f"module {name!r} changed class to {type(m).__name__}, was {cls.__name__}")
            if m.training is not training:
                out.append(f"module {name!r} has training={m.training}, was {training}")
            added = sorted(frozenset(vars(m)) - attrs)
            if added:
                out.append(f"module {name!r} gained attributes {added}")
            removed = sorted(attrs - frozenset(vars(m)))
            if removed:
                out.append(f"module {name!r} lost attributes {removed}")
            for key, before in hooks.items():
                live = getattr(m, key, ())
                now = tuple(sorted(live)) if key == "_non_persistent_buffers_set" else tuple(live)
                if now != before:
                    out.append(f"module {name!r} {key} changed ({len(before)} entries before, "
                               f"{len(now)} now)")
        now_params = dict(model.named_parameters(remove_duplicate=False))
        for name, rec in self.params.items():
            p = now_params.get(name)
            if p is None:
                out.append(f"parameter {name!r} is gone")
                continue
            if p is not rec.obj:
                out.append(f"parameter {name!r} is a different object")
            if p.dtype != rec.value.dtype:
                out.append(f"parameter {name!r} has dtype {p.dtype}, was {rec.value.dtype}")
            elif p.device != rec.value.device:
                out.append(f"parameter {name!r} is on {p.device}, was on {rec.value.device}")
            elif p.shape != rec.value.shape or not torch.equal(p.detach(), rec.value):
                out.append(f"parameter {name!r} changed value")
            if p.requires_grad is not rec.requires_grad:
                out.append(f"parameter {name!r} has requires_grad={p.requires_grad}, was "
                           f"{rec.requires_grad}")
            if (p.grad is None) != (rec.grad is None) or (
                    p.grad is not None and nested_differences(rec.grad, p.grad)):
                out.append(f"parameter {name!r} has a different .grad")
        for name in now_params.keys() - self.params.keys():
            out.append(f"parameter {name!r} was added")
        now_buffers = dict(model.named_buffers(remove_duplicate=False))
        for name, (buf, value) in self.buffers.items():
            b = now_buffers.get(name)
            if b is None:
                out.append(f"buffer {name!r} is gone")
            elif b.dtype != value.dtype:
                out.append(f"buffer {name!r} has dtype {b.dtype}, was {value.dtype}")
            elif b.shape != value.shape or not torch.equal(b, value):
                out.append(f"buffer {name!r} changed value")
            elif b is not buf:
                out.append(f"buffer {name!r} is a different tensor object")
        if list(model.state_dict()) != self.state_keys:
            out.append("model.state_dict() has other keys than before")
        if optimizer is not None:
            out += self._optimizer_differences(optimizer)
        return out

    def _optimizer_differences(self, optimizer: torch.optim.Optimizer) -> list[str]:
        out = []
        if len(optimizer.param_groups) != len(self.groups):
            return [f"the optimizer has {len(optimizer.param_groups)} param groups, was "
                    f"{len(self.groups)}"]
        for i, (g, (obj, hyper, ids)) in enumerate(zip(optimizer.param_groups, self.groups)):
            if g is not obj:
                out.append(f"optimizer param group {i} is a different dict")
            now_ids = [id(p) for p in g["params"]]
            if now_ids != ids:
                out.append(f"optimizer param group {i} holds other parameter objects")
            now_hyper = {k: v for k, v in g.items() if k != "params"}
            if nested_differences(hyper, now_hyper):
                out.append(f"optimizer param group {i} hyperparameters changed")
        now_state = {id(p): dict(s) for p, s in optimizer.state.items()}
        if now_state.keys() != self.state.keys():
            out.append("the optimizer holds state for other parameter objects")
        for key, saved in self.state.items():
            if key in now_state and nested_differences(saved, now_state[key]):
                name = self.names.get(key, "?")
                out.append(f"optimizer state of parameter {name!r} changed")
        return out


# -- the entry-point module must be cheap ---------------------------------------------------


def requirement_modules(distribution: str) -> list[str]:
    """Top-level import names of a distribution's runtime requirements, guessed
    from their project names (``transformer-engine`` -> ``transformer_engine``);
    ``mixprec``, ``torch`` and extras are left out."""
    try:
        requires = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return []
    names = []
    for req in requires:
        if "extra" in req.partition(";")[2]:
            continue
        match = re.match(r"[A-Za-z0-9._-]+", req.strip())
        if match is None:
            continue
        name = re.sub(r"[-.]+", "_", match.group(0)).lower()
        if name not in ("mixprec", "torch", "pluggy"):
            names.append(name)
    return names


def entry_point_module(distribution: str) -> str | None:
    """The module of ``distribution``'s ``mixprec`` entry point, if it has one."""
    for ep in metadata.entry_points(group="mixprec"):
        dist = getattr(ep, "dist", None)
        if ep.name == distribution or (dist is not None and dist.name == distribution):
            return ep.value.partition(":")[0]
    return None


_PROBE = """
import importlib, json, sys
import mixprec
before = set(sys.modules)
module = importlib.import_module(sys.argv[1])
hook = getattr(module, "mixprec_modes", None)
if hook is not None:
    hook()
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@functools.cache
def entry_point_imports(module: str) -> tuple[str, ...]:
    """Modules newly imported (in a fresh interpreter, after ``import mixprec``) by
    importing ``module`` and calling its ``mixprec_modes`` hook."""
    done = subprocess.run([sys.executable, "-c", _PROBE, module], capture_output=True,
                          text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"importing {module} failed in a fresh interpreter:\n{done.stderr}")
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def valid_name(name: str) -> bool:
    """Mode names: lower case, ``[a-z0-9][a-z0-9._-]*``."""
    return bool(_NAME_RE.match(name))


def is_plain(value: Any) -> bool:
    """True for None, bool, int, float, str and lists/tuples/dicts (str keys) of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False
