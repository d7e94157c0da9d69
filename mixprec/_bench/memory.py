"""Memory accounting for ``mixprec bench``: bytes counted from tensors, and step peaks.

Training state is counted from the tensors themselves, each storage once:
weights are everything reachable from the module (parameters with the objects
hanging off them, such as bitsandbytes' quantization state, buffers, tensor
attributes and persistent state-dict entries); optimizer state is every tensor
in the optimizer's state plus the fp32 masters it steps; gradients are the
``.grad`` tensors after backward.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PeakTracker", "StorageCounter", "memory_method", "tensors_in"]

_MAX_DEPTH = 4
_SKIP_ATTRS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


def tensors_in(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Plain tensors reachable from ``obj``.

    Walks containers, the inner tensors of wrapper subclasses (torchao's
    low-bit optimizer state), and the attributes of tensors and plain objects
    (a ``Params4bit`` weight's ``quant_state``). Modules and optimizers are not
    entered: they are counted by their own category.
    """
    if depth > _MAX_DEPTH or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return
    if isinstance(obj, torch.Tensor):
        flatten = getattr(type(obj), "__tensor_flatten__", None)
        if flatten is not None and type(obj) is not torch.nn.Parameter:
            names, _ = flatten(obj)
            for name in names:
                yield from tensors_in(getattr(obj, name), depth + 1)
        else:
            yield obj
        extra = getattr(obj, "__dict__", None)
        if extra:
            for value in extra.values():
                yield from tensors_in(value, depth + 1)
        return
    if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
        return
    if isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            yield from tensors_in(value, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        for value in vars(obj).values():
            yield from tensors_in(value, depth + 1)


class StorageCounter:
    """Adds up tensor bytes by storage, so shared storages (tied weights, views)
    count once across every category counted with the same counter."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, int]] = set()

    def add(self, tensors: Iterable[torch.Tensor]) -> int:
        """Bytes of the storages in ``tensors`` not counted before."""
        total = 0
        for t in tensors:
            if t.device.type == "meta":
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # exotic tensor without storage
                total += t.numel() * t.element_size()
                continue
            key = (str(t.device), storage.data_ptr())
            if storage.data_ptr() == 0 or key in self._seen:
                continue
            self._seen.add(key)
            total += storage.nbytes()
        return total

    def seen(self, t: torch.Tensor) -> bool:
        """True if ``t``'s storage was counted already."""
        return (str(t.device), t.untyped_storage().data_ptr()) in self._seen


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor a module keeps: parameters (and what hangs off them), buffers,
    tensor attributes of its submodules and persistent state-dict entries."""
    found: list[torch.Tensor] = []
    for p in module.parameters():
        found.extend(tensors_in(p))
    for b in module.buffers():
        found.extend(tensors_in(b))
    for sub in module.modules():
        for key, value in vars(sub).items():
            if key not in _SKIP_ATTRS and not key.startswith("_forward") \
                    and not key.startswith("_backward") and not key.startswith("_state_dict"):
                found.extend(tensors_in(value, 1))
    # Entries a state dict builds afresh on each call (packed metadata, serialised
    # extra state) are not kept memory: count only storages both calls return.
    first = module.state_dict(keep_vars=True)
    second = module.state_dict(keep_vars=True)
    ptrs = {t.untyped_storage().data_ptr() for t in tensors_in(second)
            if t.device.type != "meta"}
    found.extend(t for t in tensors_in(first)
                 if t.device.type != "meta" and t.untyped_storage().data_ptr() in ptrs)
    return found


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor in an optimizer's per-parameter state."""
    return list(tensors_in(dict(optimizer.state)))


@dataclass
class PeakTracker:
    """The most bytes one block of code allocates on top of what was live before it.

    On CUDA the caching allocator's ``max_memory_allocated``; on the CPU the
    allocations torch's CPU allocator reports to ``torch.profiler`` (there is no
    CPU allocator statistic): tensors only, exact, no Python objects or RSS.
    """

    device: torch.device
    transient: int = 0

    @contextlib.contextmanager
    def track(self) -> Iterator[PeakTracker]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.transient = max(0, torch.cuda.max_memory_allocated(self.device) - start)
            return
        from torch.profiler import ProfilerActivity, profile

        # Kineto prints "profiler_start/stop" lines on stderr at its default level.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                      profile_memory=True) as prof:
            yield self
        events = [e for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr, unused-ignore]
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        self.transient = peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block.

    torch's CPU allocator logs once per process, from C++, that blocks allocated
    before profiling began are freed during it: expected here, and noise to a user.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (embedded interpreters)
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def memory_method(device: torch.device) -> str:
    """How peak memory is measured on ``device``, in words (for the table)."""
    if device.type == "cuda":
        return ("peak = training state counted from tensors + the most one step allocates "
                "on top (CUDA caching allocator, max_memory_allocated)")
    return ("peak = training state counted from tensors + the most one step allocates on top "
            "(tracked tensors: allocations torch's CPU allocator reports to torch.profiler; "
            "not RSS)")
