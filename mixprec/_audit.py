"""``opt.precision.audit()``: what precision training actually runs in, in one call.

The audit reads the wrapped objects as they are now — the model's parameters, the
optimizer's groups and state, the fp32 masters, gradients, the loss scale, the
DDP / FSDP2 engine — and, through a :class:`Recorder`, the forward output, the loss
and the autocast state of the last forward. It flags the silent downgrades users
hit: a loss computed in bf16/fp16, optimizer state in lower precision than the
weights it updates, trainable parameters the optimizer does not hold, layers a mode
left unconverted (and why), and a model moved to another device after ``wrap``
(autocast still bound to the old device type).

The recorder is installed by the first ``audit()`` and by :class:`mixprec.Monitor`
at ``wrap``; ``audit(output=..., loss=...)`` reports tensors given directly.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ._match import match_module
from ._tensors import apply_to_float_tensors, ddp_class, local_tensor

if TYPE_CHECKING:
    from ._wrapper import PrecisionWrapper

__all__ = ["Audit", "AuditFlag", "Entry", "Recorder", "audit", "recorder_of"]

_LOW = (torch.float16, torch.bfloat16)


def _name(dtype: torch.dtype | None) -> str:
    return "-" if dtype is None else str(dtype).removeprefix("torch.")


@dataclass
class Entry:
    """One line of the audit: ``count`` tensors of ``numel`` elements in ``dtype`` on
    ``device``."""

    what: str
    dtype: str
    device: str
    count: int = 0
    numel: int = 0
    note: str = ""


@dataclass
class AuditFlag:
    """A silent downgrade the audit found.

    :param cause: ``loss-low-precision``, ``state-below-weights``, ``not-in-optimizer``,
        ``unconverted``, ``moved-device`` or ``no-step-yet``.
    """

    cause: str
    message: str


@dataclass
class Audit:
    """What ``audit()`` found; ``print(audit)`` shows it."""

    mode: str
    steps: int
    skipped_steps: int
    loss_scale: float | None
    sections: dict[str, list[Entry]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    flags: list[AuditFlag] = field(default_factory=list)

    @property
    def causes(self) -> set[str]:
        return {f.cause for f in self.flags}

    def entries(self, section: str) -> list[Entry]:
        return self.sections.get(section, [])

    def __str__(self) -> str:
        scale = "none (the mode does not scale the loss)" if self.loss_scale is None \
            else f"{self.loss_scale:g}"
        lines = [f"mixprec audit: mode {self.mode}, {self.steps} step(s) "
                 f"({self.skipped_steps} skipped), loss scale {scale}"]
        for section, entries in self.sections.items():
            lines.append(f"{section}:")
            for e in entries:
                size = f"{e.count} tensor(s), {e.numel:,} elements" if e.count else ""
                parts = [e.what, f"{e.dtype} on {e.device}", size, e.note]
                lines.append("  " + "  |  ".join(p for p in parts if p))
            lines += [f"  {n}" for n in self.notes.get(section, [])]
        if self.flags:
            lines.append("flags:")
            lines += [f"  [{f.cause}] {f.message}" for f in self.flags]
        else:
            lines.append("flags: none")
        return "\n".join(lines)


# -- what the forward and the loss were ---------------------------------------------------


class _ForwardRecorder:
    """Hooks on the wrapped module: the last forward's output, autocast state, DDP
    engine. Holds nothing of the wrapper, so copies of the module stay light."""

    def __init__(self) -> None:
        self.output: list[tuple[torch.dtype, str]] = []
        #: device types autocast was enabled for inside the last forward
        self.autocast: set[str] = set()
        self.device: str | None = None
        self._ddp: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ddp": None}  # a weak reference does not travel

    @property
    def ddp(self) -> Any:
        return None if self._ddp is None else self._ddp()

    def before(self, module: torch.nn.Module, args: Any) -> None:
        devices = {p.device.type for p in module.parameters()}
        self.device = devices.pop() if len(devices) == 1 else None
        self.autocast = {d for d in ("cpu", "cuda", "xpu", "mps") if _autocast_enabled(d)}
        ddp = ddp_class()
        active = None if ddp is None else ddp._get_active_ddp_module()
        if active is not None:
            self._ddp = weakref.ref(active)

    def after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.output = [(t.dtype, str(t.device)) for t in _float_tensors(output)]


class Recorder:
    """Records, for one wrapper, the last forward (through hooks on the wrapped module)
    and the dtype of the last loss given to ``opt.backward``."""

    def __init__(self, wrapper: PrecisionWrapper) -> None:
        self.forward = _ForwardRecorder()
        self.loss: tuple[torch.dtype, str] | None = None
        self._wrapper = wrapper
        module = wrapper.module
        if module is not None:
            module.module.register_forward_pre_hook(self.forward.before)
            module.register_forward_hook(self.forward.after)
        self.watch_backward(wrapper)

    def watch_backward(self, wrapper: PrecisionWrapper) -> None:
        """``opt.backward(loss)`` calls ``wrapper.backward``: record the loss on the way."""
        def backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            if isinstance(loss, torch.Tensor):
                self.loss = (loss.dtype, str(loss.device))
            type(wrapper).backward(wrapper, loss, *args, **kwargs)

        wrapper.backward = backward  # type: ignore[method-assign]


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (TypeError, RuntimeError):
        return False


def _float_tensors(data: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    apply_to_float_tensors(data, lambda t: found.append(t) or t)  # type: ignore[func-returns-value]
    return found


def _owner_and_lanes(wrapper: PrecisionWrapper) -> tuple[PrecisionWrapper,
                                                         tuple[PrecisionWrapper, ...]]:
    """The wrapper that owns the model and the wrappers of its optimizers (one, or each
    of several: ``model.precision`` and every ``opt_i.precision``)."""
    several = wrapper._several
    if several is None:
        return wrapper, (wrapper,)
    return several.owner, several.lanes


def recorder_of(wrapper: PrecisionWrapper) -> Recorder:
    """The model's recorder, installed on first use; with several optimizers one recorder
    serves the model and sees the loss given to any optimizer's ``backward``."""
    owner, lanes = _owner_and_lanes(wrapper)
    recorder = owner.__dict__.get("_audit_recorder")
    if recorder is None:
        recorder = Recorder(owner)
        owner.__dict__["_audit_recorder"] = recorder
        for other in lanes:
            if other is not owner:
                recorder.watch_backward(other)
                other.__dict__["_audit_recorder"] = recorder
    return recorder


# -- the audit ---------------------------------------------------------------------------


def _group(tensors: Iterable[torch.Tensor], what: str, note: str = "") -> list[Entry]:
    """Tensors grouped by dtype and device, one entry each."""
    groups: dict[tuple[str, str], Entry] = {}
    for t in tensors:
        t = local_tensor(t)
        key = (_name(t.dtype), str(t.device))
        entry = groups.setdefault(key, Entry(what, key[0], key[1], note=note))
        entry.count += 1
        entry.numel += t.numel()
    return list(groups.values())


def audit(wrapper: PrecisionWrapper, *, output: Any = None, loss: torch.Tensor | None = None,
          show: bool = True) -> Audit:
    """Audit ``wrapper`` (see the module docstring); print it unless ``show`` is False."""
    recorder = recorder_of(wrapper)
    result = Audit(wrapper.mode_name, wrapper.steps, wrapper.skipped_steps, wrapper.loss_scale)
    assert wrapper.module is not None
    model = wrapper.module.module
    named = list(model.named_parameters())
    # With several optimizers each has its own masters and optimizer: audit all of them
    # (the model is one), whichever optimizer's precision was asked.
    owner, lanes = _owner_and_lanes(wrapper)
    masters = {id(p): m for lane in {id(x): x for x in (owner, *lanes)}.values()
               if lane.masters is not None for p, m in lane.masters.pairs}
    stepping = [(lane, lane.optimizer.optimizer) for lane in lanes if lane.optimizer is not None]
    _weights(result, named, masters)
    if masters:
        result.sections["master weights"] = _group(masters.values(), "fp32 masters")
    for i, (lane, inner) in enumerate(stepping):
        _optimizer(result, lane, inner, masters, f"optimizer {i} " if len(stepping) > 1 else "")
    if stepping:
        _not_in_optimizer(result, [inner for _, inner in stepping], named, masters)
    _forward(result, recorder, output, loss)
    _devices(result, wrapper, named, recorder)
    _unconverted(result, wrapper, model)
    _distributed(result, wrapper, model, recorder, named)
    if wrapper.steps == 0:
        result.flags.append(AuditFlag(
            "no-step-yet", "no optimizer step yet: optimizer state, gradients, the output and "
            "the loss show after the first step; call audit() again then"))
    if show:
        print(result)
    return result


def _weights(result: Audit, named: list[tuple[str, torch.nn.Parameter]],
             masters: dict[int, torch.nn.Parameter]) -> None:
    trainable = [p for _, p in named if p.requires_grad]
    frozen = [p for _, p in named if not p.requires_grad]
    entries = _group(trainable, "trainable parameters")
    entries += _group(frozen, "frozen parameters")
    for e in entries:
        if e.what == "trainable parameters" and masters and e.dtype in ("float16", "bfloat16"):
            e.note = "stored copies of the fp32 masters"
    result.sections["model weights"] = entries
    grads = [p.grad for _, p in named if p.grad is not None]
    section = _group(grads, "on the model's parameters") if grads else []
    notes = []
    if not grads:
        dtypes = sorted({_name(p.dtype) for p in trainable})
        notes.append("none now (after zero_grad); backward writes each parameter's gradient "
                     f"in its dtype: {', '.join(dtypes) or '-'}")
    if masters:
        master_grads = [m.grad for m in masters.values() if m.grad is not None]
        section += _group(master_grads, "on the fp32 masters")
        notes.append("opt.backward adds the model's gradients into the fp32 masters' .grad "
                     "(accumulation in fp32)")
    result.sections["gradients"] = section
    result.notes["gradients"] = notes


def _optimizer(result: Audit, wrapper: PrecisionWrapper, inner: torch.optim.Optimizer,
               masters: dict[int, torch.nn.Parameter], prefix: str = "") -> None:
    """One optimizer's groups and state (``prefix`` names it among several)."""
    master_ids = {id(m) for m in masters.values()}
    groups = []
    for i, group in enumerate(inner.param_groups):
        params = list(group["params"])
        is_master = [id(p) in master_ids for p in params]
        groups += _group([p for p, m in zip(params, is_master) if m],
                         f"group {i}", "fp32 masters of 16-bit model weights")
        groups += _group([p for p, m in zip(params, is_master) if not m], f"group {i}")
    name = prefix or "optimizer "  # "optimizer state", or "optimizer 1 state" of several
    result.sections[f"{name}parameter groups"] = groups
    state: dict[tuple[str, str, str], Entry] = {}
    lower: list[str] = []
    for p, entry in inner.state.items():
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            v = local_tensor(value)
            note = "" if type(value) in (torch.Tensor, torch.nn.Parameter) \
                else type(value).__name__
            k = (str(key), _name(v.dtype), str(v.device))
            e = state.setdefault(k, Entry(f"state {key!r}", k[1], k[2], note=note))
            e.count += 1
            e.numel += v.numel()
            if (v.is_floating_point() and p.is_floating_point() and v.shape == p.shape
                    and torch.finfo(v.dtype).eps > torch.finfo(p.dtype).eps):
                lower.append(f"{wrapper.param_name(p)}[{key!r}] {_name(v.dtype)} < "
                             f"{_name(p.dtype)}")
    result.sections[f"{name}state"] = list(state.values())
    if not state:
        result.notes[f"{name}state"] = ["none yet (the optimizer creates it at its first step)"]
    quantized = [e for e in state.values()
                 if not getattr(torch, e.dtype, torch.float32).is_floating_point]
    if quantized:
        result.notes[f"{name}state"] = [
            "integer state is quantized by the optimizer mode, by design (8-bit optimizers "
            "keep block-wise scales next to it)"]
    if lower:
        result.flags.append(AuditFlag(
            "state-below-weights",
            f"optimizer state is held in lower precision than the weights it updates in "
            f"{len(lower)} tensor(s): {', '.join(lower[:4])}{' …' if len(lower) > 4 else ''}; "
            "small updates and second moments lose bits there — load or create the state "
            "in the weights' dtype"))


def _not_in_optimizer(result: Audit, inners: list[torch.optim.Optimizer],
                      named: list[tuple[str, torch.nn.Parameter]],
                      masters: dict[int, torch.nn.Parameter]) -> None:
    """Trainable parameters no optimizer holds (itself or through its fp32 master)."""
    held = {id(p) for inner in inners for g in inner.param_groups for p in g["params"]}
    held |= {pid for pid, m in masters.items() if id(m) in held}
    missing = [n for n, p in named if p.requires_grad and id(p) not in held]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        which = "any" if len(inners) > 1 else "the"
        result.flags.append(AuditFlag(
            "not-in-optimizer",
            f"{len(missing)} trainable parameter(s) are not in {which} optimizer, so they never "
            f"change: {shown}; add them (opt.add_param_group) or set requires_grad=False"))


def _forward(result: Audit, recorder: Recorder, output: Any, loss: torch.Tensor | None) -> None:
    entries = []
    outputs = ([(t.dtype, str(t.device)) for t in _float_tensors(output)]
               if output is not None else recorder.forward.output)
    for dtype, device in outputs[:4]:
        entries.append(Entry("model output", _name(dtype), device))
    loss_seen = (loss.dtype, str(loss.device)) if isinstance(loss, torch.Tensor) \
        else recorder.loss
    if loss_seen is not None:
        entries.append(Entry("loss given to opt.backward", _name(loss_seen[0]), loss_seen[1]))
    notes = []
    if not outputs or loss_seen is None:
        notes.append("not seen yet: audit() records the forward and the loss from now on "
                     "(a mixprec.Monitor does from wrap); call audit() after the next step, or "
                     "pass audit(output=out, loss=loss)")
    if recorder.forward.autocast:
        notes.append(f"autocast was on for {', '.join(sorted(recorder.forward.autocast))} in "
                     "the last forward")
    result.sections["forward"] = entries
    result.notes["forward"] = notes
    if loss_seen is not None and loss_seen[0] in _LOW:
        result.flags.append(AuditFlag(
            "loss-low-precision",
            f"the loss was computed in {_name(loss_seen[0])}: its reduction over the batch "
            "and the gradients it starts lose bits; compute it in fp32 "
            "(loss_fn(output.float(), target))"))


def _devices(result: Audit, wrapper: PrecisionWrapper,
             named: list[tuple[str, torch.nn.Parameter]], recorder: Recorder) -> None:
    devices = {p.device.type for _, p in named}
    bound = getattr(wrapper.precision_mode, "device_type", None)
    if isinstance(bound, str) and devices and bound not in devices:
        result.flags.append(AuditFlag(
            "moved-device",
            f"the model is on {', '.join(sorted(devices))} but the mode's autocast runs for "
            f"{bound!r}, the device type it was wrapped on: the model was moved after wrap, and "
            "its forward no longer runs in the mode's precision; move the model first, then "
            "wrap"))
    elif (seen := recorder.forward).autocast and seen.device and seen.device not in seen.autocast:
        result.flags.append(AuditFlag(
            "moved-device",
            f"the last forward ran on {seen.device} with autocast on only for "
            f"{', '.join(sorted(seen.autocast))}: the model was moved after wrap; move "
            "it first, then wrap"))


def _unconverted(result: Audit, wrapper: PrecisionWrapper, model: torch.nn.Module) -> None:
    mode = wrapper.precision_mode
    patterns = mode.options().get("ignore_modules") or ()
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    target = mode.param_dtype
    plan = wrapper.fsdp_plan
    if plan is not None and plan.storage_dtype is not None:
        target = plan.storage_dtype  # FSDP2 shards stored as the plan says (fp32 masters)
    found: dict[str, str] = {}
    if target is not None:
        for name, module in model.named_modules():
            own = [p for p in module._parameters.values() if p is not None
                   and p.is_floating_point() and p.dtype is not target]
            if own and name:
                found[name] = f"{_name(own[0].dtype)}, not {_name(target)}"
    else:
        swapped = [m for m in model.modules()
                   if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear]
        if swapped:
            frozen = not any(p.requires_grad for m in swapped for p in m.parameters())
            for name, module in model.named_modules():
                if type(module) is torch.nn.Linear and name:
                    trainable = any(p.requires_grad for p in module.parameters())
                    found[name] = "a plain torch.nn.Linear" + (
                        " (trainable, as adapters are)" if frozen and trainable else "")
    reasons = []
    adapters = 0
    for name, what in found.items():
        pattern = match_module(name, patterns)
        if pattern is not None:
            reasons.append(f"{name} ({what}): kept by ignore_modules pattern {pattern!r}")
        elif "adapters" in what:
            adapters += 1  # by design: the mode freezes base weights, adapters train
        else:
            reasons.append(f"{name} ({what}): the mode did not convert it (see "
                           "opt.precision.summary)")
    notes = ["left unconverted: " + r for r in reasons[:12]]
    if len(reasons) > 12:
        notes.append(f"… and {len(reasons) - 12} more")
    if adapters:
        notes.append(f"{adapters} trainable adapter layer(s) left as they are: the mode converts "
                     "and freezes base weights, by design")
    result.notes["model weights"] = notes
    if reasons:
        result.flags.append(AuditFlag(
            "unconverted", f"{len(reasons)} layer(s) left unconverted by {mode.name}: "
            + "; ".join(reasons[:3]) + (" …" if len(reasons) > 3 else "")))


def _distributed(result: Audit, wrapper: PrecisionWrapper, model: torch.nn.Module,
                 recorder: Recorder, named: list[tuple[str, torch.nn.Parameter]]) -> None:
    engine = wrapper._dist.engine
    entries: list[Entry] = []
    notes: list[str] = []
    if engine == "fsdp":
        policies: dict[tuple[str, str], int] = {}
        for module in model.modules():
            get_state = getattr(module, "_get_fsdp_state", None)
            if get_state is None:
                continue
            policy = get_state()._mp_policy
            key = (_name(policy.param_dtype), _name(policy.reduce_dtype or policy.param_dtype))
            policies[key] = policies.get(key, 0) + 1
        stored = sorted({_name(p.dtype) for _, p in named})
        for (gather, reduce), count in policies.items():
            gather = gather if gather != "-" else "/".join(stored) + " (as stored)"
            reduce = reduce if reduce != "-" else gather
            entries.append(Entry("FSDP2 all-gather", gather, "-", note=f"{count} module(s)"))
            entries.append(Entry("FSDP2 reduce-scatter", reduce, "-",
                                 note=f"{count} module(s)"))
    elif engine == "ddp":
        ddp = recorder.forward.ddp
        grads = sorted({_name(p.dtype) for _, p in named if p.requires_grad})
        reduce = "/".join(grads)
        note = "gradients all-reduced in their dtype"
        if ddp is not None and getattr(ddp, "_comm_hooks", None):
            hooks = ", ".join(getattr(h, "__name__", type(h).__name__) for h, _ in ddp._comm_hooks)
            note = f"through communication hook(s) {hooks}: the dtype they send"
        elif ddp is not None and getattr(ddp, "mixed_precision", None) is not None:
            reduce = _name(ddp.mixed_precision.reduce_dtype)
            note = "DDP's own mixed_precision.reduce_dtype"
        entries.append(Entry("DDP all-reduce", reduce, "-", note=note))
    else:
        notes.append("single process (no DDP forward or FSDP2 sharding seen)")
    result.sections["distributed"] = entries
    result.notes["distributed"] = notes
