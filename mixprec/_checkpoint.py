"""The checkpoint format: what ``state_dict()`` of a wrapped pair holds besides
the model and optimizer state, its version, and the mode check on load.

A checkpoint is ``{"model": …, "optimizer": {…, "mixprec": PRECISION}}``, or
``{"model": …, "mixprec": PRECISION}`` without an optimizer (and for sharded
FSDP2 checkpoints). ``PRECISION`` holds plain values only, so checkpoints load
with ``torch.load(..., weights_only=True)``::

    {"format": 1, "mode": "16-mixed", "options": {...}, "scaler": {...} | None,
     "steps": int, "skipped_steps": int, "mode_state": {...}}

An optimizer state dict also holds a copy of its ``"mixprec"`` entry in its first
param group: torch's own ``Optimizer.load_state_dict`` drops unknown top-level keys
but keeps a group's, so a state dict loaded into the plain optimizer before ``wrap``
still carries the loss scale and step counters, and ``wrap`` resumes them
(:func:`carried_state`). Readers take the top-level entry and drop the copies.

A model wrapped with several optimizers (``wrap(model, [opt_a, opt_b])``) writes
``{"model": …, "optimizers": [{…, "mixprec": PRECISION}, …], "mixprec": SEVERAL}``:
each optimizer's state dict as ``opt.state_dict()`` writes it, and ``SEVERAL`` is
``PRECISION`` in format 2 plus ``"optimizers": int`` and ``"round": {"stepped":
[bool, …], "found_inf": bool}`` (which optimizers stepped since the shared loss
scale was last updated). Format 2 makes an older mixprec refuse the checkpoint
instead of loading only its model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .exceptions import CheckpointError

__all__ = ["FORMAT", "KEY", "SEVERAL_FORMAT", "carried_state", "check_mode",
           "check_module_state", "check_optimizer_count", "check_optimizer_state",
           "check_precision_state", "drop_carried_state", "find_precision_state",
           "optimizer_state", "precision_state", "several_state", "split_optimizer_state"]

#: version of the format written for a model with one optimizer (or none)
FORMAT = 1
#: version of the ``"mixprec"`` entry of a checkpoint of several optimizers (the newest read)
SEVERAL_FORMAT = 2
#: where the precision state sits in an optimizer's (or a whole) state dict
KEY = "mixprec"


def precision_state(
    *, mode: str, options: Mapping[str, Any], scaler: Mapping[str, Any] | None, steps: int,
    skipped_steps: int, mode_state: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``"mixprec"`` entry of a checkpoint."""
    return {
        "format": FORMAT,
        "mode": mode,
        "options": dict(options),
        "scaler": None if scaler is None else dict(scaler),
        "steps": steps,
        "skipped_steps": skipped_steps,
        "mode_state": dict(mode_state),
    }


def several_state(entry: Mapping[str, Any], *, stepped: list[bool], found_inf: bool) -> dict[str, Any]:
    """The ``"mixprec"`` entry of a checkpoint of several optimizers: ``entry`` (a
    :func:`precision_state`) in format 2, with the optimizers' number and the open round."""
    return {**entry, "format": SEVERAL_FORMAT, "optimizers": len(stepped),
            "round": {"stepped": list(stepped), "found_inf": bool(found_inf)}}


def check_optimizer_count(checkpoint: Mapping[str, Any], count: int) -> None:
    """Raise :class:`CheckpointError` unless the whole ``checkpoint`` holds the state of
    ``count`` optimizers: one ``"optimizer"`` entry for ``count == 1``, else an
    ``"optimizers"`` list of ``count`` and a format-2 ``"mixprec"`` entry with its round."""
    several = checkpoint.get("optimizers")
    if count == 1:
        if several is not None:
            n = len(several) if isinstance(several, list) else "several"
            raise CheckpointError(
                f"The checkpoint holds the state of {n} optimizers but this model was wrapped "
                "with one; wrap it with as many, mixprec.wrap(model, [opt_a, opt_b, ...], "
                "mode), to resume it, or load only the weights with model.load_state_dict()."
            )
        return
    if several is None:
        what = "one optimizer" if "optimizer" in checkpoint else "no optimizer"
        raise CheckpointError(
            f"The checkpoint holds the state of {what} but this model was wrapped with "
            f"{count}; resume it with the wrap that saved it, or load only the weights with "
            "model.load_state_dict()."
        )
    if not isinstance(several, list) or not all(isinstance(o, Mapping) for o in several):
        raise _fail("'optimizers' must be a list of optimizer state dicts", "optimizers")
    if len(several) != count:
        raise CheckpointError(
            f"The checkpoint holds the state of {len(several)} optimizers but this model was "
            f"wrapped with {count}; wrap it with the same optimizers, in the same order, to "
            "resume it."
        )
    entry = checkpoint.get(KEY)
    if not isinstance(entry, Mapping) or entry.get("optimizers") != count:
        raise _fail(f"the {KEY!r} entry does not say {count} optimizers", KEY)
    round_ = entry.get("round")
    round_ = round_ if isinstance(round_, Mapping) else {}
    stepped = round_.get("stepped")
    if (not isinstance(stepped, list) or len(stepped) != count
            or not all(isinstance(s, bool) for s in stepped)
            or not isinstance(round_.get("found_inf"), bool)):
        raise _fail(f"'round' must hold 'stepped' ({count} booleans) and 'found_inf' "
                    "(a boolean)", f"{KEY}.round")


def optimizer_state(inner: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer state dict a wrapped optimizer writes: the inner optimizer's ``inner``
    with ``entry`` (a :func:`precision_state`) at the top and copied into the first param
    group, which survives a load into the plain torch optimizer."""
    state = dict(inner)
    state[KEY] = entry
    groups = state.get("param_groups")
    if isinstance(groups, list) and groups and isinstance(groups[0], Mapping):
        state["param_groups"] = [{**groups[0], KEY: entry}, *groups[1:]]
    return state


def split_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """An optimizer state dict without its ``"mixprec"`` entry (nor the copies in its
    param groups), and that entry (or None): the top-level one, else a group's copy."""
    inner = dict(state)
    entry = inner.pop(KEY, None)
    groups = inner.get("param_groups")
    if isinstance(groups, list) and any(isinstance(g, Mapping) and KEY in g for g in groups):
        copies = [g[KEY] for g in groups if isinstance(g, Mapping) and KEY in g]
        entry = copies[0] if entry is None else entry
        inner["param_groups"] = [{k: v for k, v in g.items() if k != KEY}
                                 if isinstance(g, Mapping) else g for g in groups]
    return inner, entry


def carried_state(optimizer: torch.optim.Optimizer) -> Any:
    """The ``"mixprec"`` entry a mixprec optimizer state dict loaded into the plain
    ``optimizer`` left in its param groups (torch keeps group keys), or None."""
    return next((g[KEY] for g in optimizer.param_groups if KEY in g), None)


def drop_carried_state(optimizer: torch.optim.Optimizer | None) -> None:
    """Remove what :func:`carried_state` found from ``optimizer``'s param groups."""
    for group in [] if optimizer is None else optimizer.param_groups:
        group.pop(KEY, None)


def find_precision_state(checkpoint: Mapping[str, Any]) -> Any:
    """The ``"mixprec"`` entry of a whole checkpoint, wherever it sits (or None)."""
    optimizer = checkpoint.get("optimizer")
    if isinstance(optimizer, Mapping) and KEY in optimizer:
        return optimizer[KEY]
    return checkpoint.get(KEY)


def check_mode(state: Any, mode_name: str) -> None:
    """Raise :class:`CheckpointError` if ``state`` was saved in another mode."""
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"The checkpoint's {KEY!r} entry is a {type(state).__name__}, not the mapping "
            "mixprec writes; pass what opt.precision.state_dict() saved."
        )
    if "mode" not in state:
        raise CheckpointError(
            f"The checkpoint's {KEY!r} entry names no mode, so it was not written by "
            "mixprec or is damaged; pass what opt.precision.state_dict() saved, or load only "
            "the model weights with model.load_state_dict()."
        )
    mode = state["mode"]
    if mode != mode_name:
        raise CheckpointError(
            f"The checkpoint was saved in mode {mode!r} but this wrapper runs "
            f"{mode_name!r}; wrap with mode={mode!r} to resume it, or load only the "
            "model weights with model.load_state_dict()."
        )


#: Per-parameter optimizer state that has the parameter's shape (torch's optimizers,
#: bitsandbytes' state1/state2, torchao's low-bit states).
_PARAM_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer",
                           "square_avg", "grad_avg", "acc_delta", "sum", "ax", "prev",
                           "state1", "state2"})


def _where(path: str) -> str:
    return f" (at {path})" if path else ""


def _fail(what: str, path: str = "") -> CheckpointError:
    return CheckpointError(
        f"The checkpoint cannot be loaded: {what}{_where(path)}; nothing was changed. Pass a "
        "checkpoint saved by opt.precision.state_dict() in the same mode and for the same model."
    )


def _int(state: Mapping[str, Any], key: str, path: str, minimum: int) -> None:
    value = state.get(key, minimum)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(f"{key} must be an integer >= {minimum}, got {value!r}", f"{path}.{key}")


def check_precision_state(
    state: Any, *, mode_name: str, options: Mapping[str, Any], has_scaler: bool,
    resumable: Iterable[str] = (),
) -> None:
    """Validate a ``"mixprec"`` entry against the wrapper about to load it.

    :param options: the loading wrapper's mode options; the saved ones must be equal,
        except for the names in ``resumable`` (loss-scaler dynamics that may change
        on resume: the loading wrapper's values then apply).
    :param has_scaler: the loading mode scales the loss (the entry must hold a scaler).
    """
    check_mode(state, mode_name)
    version = state.get("format")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _fail(f"unknown checkpoint format {version!r}", f"{KEY}.format")
    if version > SEVERAL_FORMAT:
        raise CheckpointError(
            f"The checkpoint was written in format {version} by a newer mixprec; this "
            f"mixprec reads format {SEVERAL_FORMAT} and older: upgrade mixprec to load it."
        )
    saved = state.get("options", {})
    if not isinstance(saved, Mapping):
        raise _fail(f"options must be a mapping, got {type(saved).__name__}", f"{KEY}.options")
    skip = set(resumable)
    mine = {k: v for k, v in options.items() if k not in skip}
    theirs = {k: v for k, v in saved.items() if k not in skip}
    if mine != theirs:
        differ = sorted(k for k in {*mine, *theirs} if mine.get(k, "<default>")
                        != theirs.get(k, "<default>"))
        raise CheckpointError(
            f"The checkpoint was saved in mode {mode_name!r} with options {dict(theirs)} but "
            f"this wrapper runs it with {dict(mine)} ({', '.join(differ)} differ); wrap with "
            "the checkpoint's options to resume it. Only the loss-scaler options "
            f"{', '.join(sorted(skip)) or '(none)'} may change on resume."
        )
    for key in ("steps", "skipped_steps"):
        _int(state, key, KEY, 0)
    mode_state = state.get("mode_state") or {}
    if not isinstance(mode_state, Mapping):
        raise _fail("mode_state must be a mapping", f"{KEY}.mode_state")
    scaler = state.get("scaler")
    if has_scaler:
        _check_scaler(scaler)


def _check_scaler(scaler: Any) -> None:
    path = f"{KEY}.scaler"
    if not isinstance(scaler, Mapping):
        raise _fail("the mode scales the loss but the checkpoint holds no loss-scaler state",
                    path)
    for key in ("scale", "growth_tracker", "hysteresis_left"):
        if key not in scaler:
            raise _fail(f"the loss-scaler state has no {key!r}", path)
    scale = scaler["scale"]
    if (isinstance(scale, bool) or not isinstance(scale, (int, float))
            or not math.isfinite(scale) or scale <= 0):
        raise _fail(f"the loss scale must be a positive finite number, got {scale!r}",
                    f"{path}.scale")
    _int(scaler, "growth_tracker", path, 0)
    _int(scaler, "hysteresis_left", path, 1)


def check_module_state(
    expected: Mapping[str, Any], given: Any, strict: bool, tensors: Iterable[str],
) -> None:
    """Validate a model state dict against the one the wrapped model would write.

    Only the model's own parameters and buffers (``tensors``: their dotted names) must
    be present (where ``strict``, which also refuses keys the model would not write),
    and of the expected shape where both sides are
    floating point; what a mode adds or stores differently (quantization state,
    packed integer weights, ``_extra_state``) is the mode's to load and check.
    """
    if not isinstance(given, Mapping):
        raise _fail(f"the model state is a {type(given).__name__}, not a mapping", "model")
    names = [k for k in tensors if k in expected]
    if strict:
        missing = [k for k in names if k not in given]
        unexpected = [k for k in given if k not in expected]
        if missing or unexpected:
            parts = ([f"missing {_few(missing)}"] if missing else []) + (
                [f"unexpected {_few(unexpected)}"] if unexpected else [])
            raise _fail("the model's keys differ: " + "; ".join(parts) +
                        " (load with strict=False to allow that)", "model")
    for key in names:
        value, want = given.get(key), expected[key]
        if not (torch.is_tensor(value) and torch.is_tensor(want)):
            continue
        if (value.is_floating_point() and want.is_floating_point()
                and value.shape != want.shape):
            raise _fail(f"shape {tuple(value.shape)} where the model has {tuple(want.shape)}",
                        f"model.{key}")


def check_optimizer_state(optimizer: torch.optim.Optimizer, given: Any) -> None:
    """Validate an optimizer state dict (without its ``"mixprec"`` entry) against
    ``optimizer``: groups, parameters per group, and per-parameter state shapes."""
    if not isinstance(given, Mapping):
        raise _fail(f"the optimizer state is a {type(given).__name__}, not a mapping",
                    "optimizer")
    for key in ("state", "param_groups"):
        if key not in given:
            raise _fail(f"the optimizer state has no {key!r}", "optimizer")
    groups, state = given["param_groups"], given["state"]
    if not isinstance(state, Mapping) or not isinstance(groups, list) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
        raise _fail("'state' must be a mapping and 'param_groups' a list of groups with "
                    "'params'", "optimizer")
    mine = optimizer.param_groups
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in mine]:
        raise _fail(f"parameter groups of sizes {[len(g['params']) for g in groups]} where "
                    f"the optimizer has {[len(g['params']) for g in mine]}", "optimizer")
    params = {i: p for g, mg in zip(groups, mine) for i, p in zip(g["params"], mg["params"])}
    for index, entry in state.items():
        path = f"optimizer.state[{index!r}]"
        if index not in params:
            raise _fail("state for a parameter no group holds", path)
        if not isinstance(entry, Mapping):
            raise _fail(f"a {type(entry).__name__}, not a mapping", path)
        p = params[index]
        live = optimizer.state.get(p, {})
        for key, value in entry.items():
            if not torch.is_tensor(value):
                continue
            want = live.get(key)
            shape = (tuple(want.shape) if torch.is_tensor(want)
                     else tuple(p.shape) if key in _PARAM_SHAPED else None)
            if shape is not None and tuple(value.shape) != shape:
                raise _fail(f"shape {tuple(value.shape)} where {shape} is needed",
                            f"{path}[{key!r}]")


def _few(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:5]) + (f" and {len(keys) - 5} more"
                                                      if len(keys) > 5 else "")
