"""FP8 recipes: validate a recipe given as a dict, build TE's recipe object, describe one.

A dict is checked key by key without Transformer Engine (so a typo fails when the
mode is built, on any machine); the TE object is built when the mode is used, and
keys the installed TE release does not know are reported then, never passed
through blindly::

    {"scaling": "delayed", "fp8_format": "HYBRID", "amax_history_len": 16,
     "amax_compute_algo": "max"}
    {"scaling": "current", "fp8_format": "E4M3"}
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from mixprec.exceptions import ModeOptionError

from ._te import te_version

__all__ = ["SCALINGS", "build_recipe", "describe_recipe", "is_te_recipe", "normalize_recipe"]

#: ``scaling`` value -> (TE class name, first TE release that has it)
SCALINGS: dict[str, tuple[str, str]] = {
    "delayed": ("DelayedScaling", "1.0"),
    "current": ("Float8CurrentScaling", "2.2"),
}
_FORMATS = ("HYBRID", "E4M3")


def _format(value: Any) -> str:
    name = value.name if isinstance(value, enum.Enum) else value
    if isinstance(name, str) and name.upper() in _FORMATS:
        return name.upper()
    if isinstance(name, str) and name.upper() == "E5M2":
        raise ModeOptionError(
            "Recipe fp8_format 'E5M2' is not supported: Transformer Engine does not train in "
            "pure E5M2; use 'HYBRID' (E4M3 forward, E5M2 gradients) or 'E4M3'."
        )
    raise ModeOptionError(
        f"Recipe fp8_format {value!r} is not an FP8 format; use 'HYBRID' (E4M3 forward, "
        "E5M2 gradients) or 'E4M3'."
    )


def _int(minimum: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ModeOptionError(
                f"Recipe {key} must be an integer >= {minimum}, got {value!r}."
            )
        return value
    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ModeOptionError(f"Recipe {key} must be True or False, got {value!r}.")
    return value


def _algo(key: str, value: Any) -> str:
    if value not in ("max", "most_recent"):
        raise ModeOptionError(
            f"Recipe {key} must be 'max' or 'most_recent', got {value!r}; for a custom "
            "function pass a DelayedScaling object as the recipe."
        )
    return str(value)


_CHECKS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "delayed": {
        "fp8_format": lambda _k, v: _format(v),
        "margin": _int(0),
        "amax_history_len": _int(1),
        "amax_compute_algo": _algo,
        "reduce_amax": _bool,
        "fp8_dpa": _bool,
        "fp8_mha": _bool,
    },
    "current": {
        "fp8_format": lambda _k, v: _format(v),
        "fp8_dpa": _bool,
        "fp8_mha": _bool,
    },
}


def normalize_recipe(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check a recipe dict and return it with ``scaling`` filled in and values canonical.

    :raises ModeOptionError: an unknown key (with a suggestion), a key the chosen
        scaling does not take, or a bad value.
    """
    if not isinstance(spec, Mapping):
        raise ModeOptionError(
            f"The recipe must be a dict or a Transformer Engine recipe object, got "
            f"{type(spec).__name__}."
        )
    spec = dict(spec)
    scaling = spec.pop("scaling", "delayed")
    if scaling not in SCALINGS:
        raise ModeOptionError(
            f"Recipe scaling {scaling!r} is not supported; use one of "
            f"{', '.join(repr(s) for s in SCALINGS)} (or pass a TE recipe object)."
        )
    checks = _CHECKS[scaling]
    known = {k for c in _CHECKS.values() for k in c}
    out: dict[str, Any] = {"scaling": scaling}
    for key, value in spec.items():
        if not isinstance(key, str) or key not in checks:
            if key in known:
                raise ModeOptionError(
                    f"Recipe key {key!r} does not apply to {scaling} scaling; it takes "
                    f"{', '.join(checks)}."
                )
            close = difflib.get_close_matches(str(key), [*known, "scaling"], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ModeOptionError(
                f"Unknown recipe key {key!r}.{hint} {scaling.capitalize()} scaling takes: "
                f"scaling, {', '.join(checks)}."
            )
        out[key] = checks[key](key, value)
    return out


def build_recipe(spec: Mapping[str, Any] | None, recipe_module: ModuleType) -> Any:
    """Build TE's recipe object from a :func:`normalize_recipe` dict (None: TE's
    default ``DelayedScaling()``).

    :raises ModeOptionError: the installed TE lacks the scaling or one of the keys.
    """
    spec = dict(spec or {"scaling": "delayed"})
    scaling = spec.pop("scaling")
    class_name, since = SCALINGS[scaling]
    cls = getattr(recipe_module, class_name, None)
    if cls is None:
        raise ModeOptionError(
            f"Recipe scaling {scaling!r} needs transformer_engine.common.recipe.{class_name}, "
            f"which Transformer Engine {te_version()} lacks; upgrade to >= {since} or use "
            "'delayed' scaling."
        )
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if fields is not None and key not in fields:
            raise ModeOptionError(
                f"Recipe key {key!r} is not an option of {class_name} in Transformer Engine "
                f"{te_version()}; upgrade Transformer Engine or leave the key out."
            )
        kwargs[key] = getattr(recipe_module.Format, value) if key == "fp8_format" else value
    return cls(**kwargs)


def is_te_recipe(obj: object) -> bool:
    """True for a recipe object from ``transformer_engine.common.recipe``."""
    module = type(obj).__module__
    return module.split(".")[0] == "transformer_engine" and "recipe" in module


def describe_recipe(recipe: Any) -> dict[str, Any]:
    """A recipe object as plain values (for options in checkpoints and the summary)."""
    name = type(recipe).__name__
    scaling = next((s for s, (cls, _) in SCALINGS.items() if cls == name), name)
    out: dict[str, Any] = {"scaling": scaling}
    if not dataclasses.is_dataclass(recipe):
        return out
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name, None)
        if isinstance(value, enum.Enum):
            out[f.name] = value.name
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[f.name] = value
    return out
