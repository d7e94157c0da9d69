"""The plugin registry: which modes exist, who provides them, how to build them."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from ._interface import TAGS, ModeSpec, OptimizerMode, PrecisionMode
from ._modestring import NAME_RE, ModePart, parse_mode_string
from ._version import PLUGIN_API_VERSION, __version__
from .exceptions import (
    DuplicateModeError,
    MissingDependencyError,
    ModeFactoryError,
    ModeOptionError,
    ModeSyntaxError,
    PluginError,
    UnknownModeError,
)

__all__ = ["ModeEntry", "Registry", "registry", "use_registry"]

ENTRY_POINT_GROUP = "mixprec"
LOAD_ENV = "MIXPREC_LOAD_PLUGINS"

#: The one place the core names plugin modes: first-party modes and the distribution
#: that provides each, for the "pip install" hint of an unknown mode. Each first-party
#: plugin's tests check that it provides exactly the names given here for it.
FIRST_PARTY_MODES: dict[str, str] = {
    **dict.fromkeys(("nf4", "nf4-dq", "fp4", "fp4-dq", "int8", "int8-training", "adam8bit",
                     "adamw8bit", "paged-adam8bit", "paged-adamw8bit"), "mixprec-bnb"),
    **dict.fromkeys(("transformer-engine", "transformer-engine-float16"), "mixprec-te"),
    **dict.fromkeys(("fp8-tensorwise", "fp8-rowwise", "fp8-rowwise-gw-hp", "ao-adamw8bit",
                     "ao-adamw4bit", "ao-adamw-fp8"), "mixprec-torchao"),
}


@dataclass(frozen=True)
class ModeEntry:
    """A registered mode and where it comes from."""

    spec: ModeSpec
    provider: str
    version: str

    @property
    def name(self) -> str:
        return self.spec.name


def first_party_provider(name: str) -> str | None:
    """The first-party distribution that provides ``name``, if any."""
    return FIRST_PARTY_MODES.get(name)


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them: ``Mixprec.BNB`` and
    ``mixprec_bnb`` are ``mixprec-bnb``."""
    return re.sub(r"[-_.]+", "-", name).lower()


#: Names only the distribution of that name may use for an entry point: the core's
#: and the first-party plugins'.
RESERVED = frozenset({"mixprec", *map(normalize, FIRST_PARTY_MODES.values())})


def owns(distribution: str, entry_point: str) -> bool:
    """Whether ``distribution`` may declare a ``mixprec`` entry point of that name.

    The name of a plugin's entry point is its distribution's name; a distribution
    with several entry points names the others after itself (``mixprec-foo-extra``
    of ``mixprec-foo``). Any other name claims a distribution that did not declare
    it, and such an entry point would load in that distribution's place.
    """
    dist, name = normalize(distribution), normalize(entry_point)
    return name == dist or (name.startswith(f"{dist}-") and name not in RESERVED)


class Registry:
    """Modes from the core and from plugins, loaded lazily.

    The core modes are registered on first use. Installed plugins are imported
    only when a name that is not a core mode is looked up, or when the full
    listing is asked for (:meth:`modes`, :meth:`broken`, :meth:`conflicts`): a
    plugin can never replace a core mode, so wrapping with one needs no plugin,
    and a slow or misbehaving plugin costs nothing to a program that does not
    use it.

    :param entry_points: discover plugins through the ``mixprec`` entry-point
        group (filtered by ``MIXPREC_LOAD_PLUGINS``). Tests pass False and
        register plugins by hand.
    """

    def __init__(self, *, entry_points: bool = True) -> None:
        self._entry_points = entry_points
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._loaded = False  # the core modes and plugins registered by hand
        self._plugins_loaded = False  # the installed plugins (entry points)
        self._dists: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self._broken: dict[str, str] = {}
        self._modes: dict[str, ModeEntry] = {}
        self._conflicts: dict[str, list[str]] = {}
        # installed plugins MIXPREC_LOAD_PLUGINS leaves out: normalised name -> (dist, version)
        self._excluded: dict[str, tuple[str, str]] = {}
        self._unmatched: dict[str, str] = {}  # names in MIXPREC_LOAD_PLUGINS, installed nowhere

    # -- loading -------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        """Register the core modes (once); installed plugins stay unloaded."""
        if self._loaded:
            return
        self._loaded = True
        from . import _builtin_modes as _modes

        self._pm.register(_modes, name="mixprec")
        self._dists["mixprec"] = ("mixprec", __version__)
        self._collect()

    def _ensure_plugins(self) -> None:
        """Load the installed plugins (once), for a plugin mode or the full listing."""
        self._ensure_loaded()
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        if self._entry_points:
            self._load_entry_points()
            self._collect()

    def _load_entry_points(self) -> None:
        """Load the entry points ``MIXPREC_LOAD_PLUGINS`` allows (all when unset).

        The variable lists distribution names, compared as PEP 503 normalises them.
        An entry point is loaded only if the distribution that declares it owns its
        name (:func:`owns`); one that claims another distribution's name is never
        imported and is reported in :meth:`broken`, naming both distributions.
        """
        wanted = os.environ.get(LOAD_ENV)
        listed = [] if wanted is None else [n.strip() for n in wanted.split(",") if n.strip()]
        allowed = None if wanted is None else {normalize(n) for n in listed}
        installed: dict[str, str] = {}  # what the variable can name: normalised -> as declared
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.name if dist is not None else "an unknown distribution"
            genuine = dist is not None and owns(dist_name, ep.name)
            if genuine:
                installed.setdefault(normalize(ep.name), ep.name)
            if allowed is not None and normalize(ep.name) not in allowed:
                if genuine:
                    self._excluded.setdefault(normalize(ep.name), (dist_name, _version(dist)))
                continue
            if not genuine:
                self._broken[f"{dist_name}:{ep.name}"] = (
                    f"entry point {ep.name!r} is declared by distribution {dist_name!r}, "
                    f"not by {ep.name}: not loaded"
                )
                continue
            if self._pm.has_plugin(ep.name) or ep.name in self._broken:
                continue
            try:
                plugin = ep.load()
                self._pm.register(plugin, name=ep.name)
            except BaseException as exc:  # a broken plugin must not break the others
                self._broken[ep.name] = _failure(exc)
                continue
            self._dists[ep.name] = (dist_name, _version(dist))
        for name in listed:
            if normalize(name) in installed or normalize(name) == "mixprec":
                continue
            close = difflib.get_close_matches(normalize(name), list(installed), n=1)
            self._unmatched[name] = (
                "no installed distribution provides a mixprec plugin of that name; " + (
                    f"did you mean {installed[close[0]]!r}?" if close else
                    f"installed: {', '.join(sorted(installed.values()))}" if installed else
                    "no mixprec plugin is installed"))

    def _collect(self) -> None:
        modes: dict[str, ModeEntry] = {}
        conflicts: dict[str, list[str]] = {}
        for impl in self._pm.hook.mixprec_modes.get_hookimpls():
            plugin = impl.plugin_name
            if plugin in self._broken:
                continue
            dist, version = self._dists.get(plugin, (plugin, "registered by hand"))
            try:
                specs: list[Any] = list(impl.function())  # type: ignore[call-overload]
                for spec in specs:
                    _check_spec(spec)
            except BaseException as exc:
                self._broken[plugin] = f"mixprec_modes() failed: {_failure(exc)}"
                continue
            for spec in specs:
                if spec.api_version > PLUGIN_API_VERSION:
                    self._broken[f"{dist}:{spec.name}"] = (
                        f"mode {spec.name!r} needs plugin API {spec.api_version}, this mixprec "
                        f"{__version__} has {PLUGIN_API_VERSION}: upgrade mixprec"
                    )
                    continue
                core = modes.get(spec.name)
                if core is not None and core.provider == "mixprec":
                    self._broken[f"{dist}:{spec.name}"] = (
                        f"mode {spec.name!r} is a core mode of mixprec and cannot be replaced; "
                        "rename the plugin's mode"
                    )
                    continue
                if spec.name in conflicts:
                    conflicts[spec.name].append(dist)
                elif spec.name in modes:
                    conflicts[spec.name] = [modes.pop(spec.name).provider, dist]
                else:
                    modes[spec.name] = ModeEntry(spec, dist, version)
        self._modes = modes
        self._conflicts = conflicts

    def register(
        self, plugin: object, name: str | None = None, *, distribution: str | None = None,
        version: str = "registered by hand",
    ) -> str:
        """Register a plugin object by hand (tests, notebooks); return its name."""
        self._ensure_loaded()
        registered = self._pm.register(plugin, name=name)
        if registered is None:
            raise PluginError(f"Plugin {name!r} is already registered.", plugin=str(name))
        self._dists[registered] = (distribution or registered, version)
        self._collect()
        return registered

    def unregister(self, name: str) -> None:
        """Remove a plugin registered under ``name``."""
        self._ensure_loaded()
        self._pm.unregister(name=name)
        self._dists.pop(name, None)
        self._broken.pop(name, None)
        self._collect()

    # -- queries -------------------------------------------------------------

    def modes(self) -> dict[str, ModeEntry]:
        """Every usable mode by name."""
        self._ensure_plugins()
        return dict(sorted(self._modes.items()))

    def broken(self) -> dict[str, str]:
        """Plugins (or modes) that could not be loaded, with the reason."""
        self._ensure_plugins()
        return dict(self._broken)

    def conflicts(self) -> dict[str, list[str]]:
        """Mode names claimed by more than one distribution."""
        self._ensure_plugins()
        return {k: list(v) for k, v in self._conflicts.items()}

    def unmatched(self) -> dict[str, str]:
        """Names in ``MIXPREC_LOAD_PLUGINS`` that match no installed plugin, with a
        did-you-mean: a misspelt name there would otherwise leave a plugin out silently."""
        self._ensure_plugins()
        return dict(self._unmatched)

    def entry(self, name: str) -> ModeEntry:
        """The registered mode ``name``; raises a helpful error if there is none.

        A core mode is returned without loading the installed plugins.
        """
        self._ensure_loaded()
        core = self._modes.get(name)
        if core is not None and core.provider == "mixprec":
            return core
        self._ensure_plugins()
        if name in self._modes:
            return self._modes[name]
        if name in self._conflicts:
            providers = self._conflicts[name]
            raise DuplicateModeError(
                f"Mode {name!r} is provided by more than one distribution "
                f"({', '.join(providers)}). Uninstall one of them or set "
                f"{LOAD_ENV} to the distributions to load.",
                mode=name, providers=providers,
            )
        available = sorted(self._modes)
        provider = first_party_provider(name)
        message = f"Unknown precision mode {name!r}. Available: {', '.join(available) or 'none'}."
        close = difflib.get_close_matches(name, [*available, *FIRST_PARTY_MODES], n=1)
        if close and close[0] != name:
            message += f" Did you mean {close[0]!r}?"
        if provider is not None:
            message += self._provider_hint(name, provider)
        elif close and (hint := first_party_provider(close[0])) and close[0] not in self._modes:
            message += self._provider_hint(close[0], hint)
        elif self._excluded:
            message += (f" Installed plugins that {LOAD_ENV} leaves out: "
                        f"{', '.join(sorted(self._excluded))}.")
        raise UnknownModeError(message, mode=name, available=available, provider=provider)

    def _provider_hint(self, mode: str, provider: str) -> str:
        """Where first-party ``mode`` comes from: its ``pip install``, or, where its
        distribution is installed but left out by ``MIXPREC_LOAD_PLUGINS``, that."""
        excluded = self._excluded.get(normalize(provider))
        if excluded is None:
            return f" Mode {mode!r} is provided by {provider}: pip install {provider}"
        dist, version = excluded
        return (f" Mode {mode!r} is provided by {dist} {version}, which is installed but not "
                f"loaded: {LOAD_ENV}={os.environ.get(LOAD_ENV, '')!r} leaves it out; add "
                f"{dist} to it or unset it.")

    # -- building ------------------------------------------------------------

    def build(
        self, mode: str | PrecisionMode | OptimizerMode | Sequence[Any], options: dict[str, Any]
    ) -> tuple[PrecisionMode, list[OptimizerMode]]:
        """Turn a mode string, mode object or list of them into mode objects.

        ``options`` go to the first part, which must then be a mode name; options in
        a mode string's brackets go to their part.
        """
        parts = _split(mode)
        if options and not (parts and isinstance(parts[0], ModePart)):
            raise ModeOptionError(
                "Options were given together with a mode object; pass them to the "
                "mode object's constructor instead."
            )
        precision: PrecisionMode | None = None
        optimizers: list[OptimizerMode] = []
        for index, part in enumerate(parts):
            obj = self._instantiate(part, options if index == 0 else {})
            if isinstance(obj, PrecisionMode):
                if precision is not None or optimizers:
                    raise ModeSyntaxError(
                        f"Mode {_describe(mode)!r} joins more than one precision mode or puts one "
                        "after an optimizer mode; write one precision mode first, then "
                        "optimizer modes: 'bf16-true+adamw8bit'.",
                        spec=_describe(mode),
                    )
                precision = obj
            elif isinstance(obj, OptimizerMode):
                if optimizers:
                    raise ModeSyntaxError(
                        f"Mode {_describe(mode)!r} joins two optimizer modes; use at most one.",
                        spec=_describe(mode),
                    )
                optimizers.append(obj)
            else:
                raise ModeSyntaxError(
                    f"{part!r} is not a mode: pass a mode name, a PrecisionMode or an "
                    "OptimizerMode.",
                    spec=_describe(mode),
                )
        if precision is None:
            built = self._instantiate(ModePart("32-true"), {})
            assert isinstance(built, PrecisionMode)
            precision = built
        return precision, optimizers

    def _instantiate(self, part: Any, options: dict[str, Any]) -> Any:
        if not isinstance(part, ModePart):
            return part
        twice = sorted(set(part.options) & set(options))
        if twice:
            raise ModeOptionError(
                f"Option {twice[0]!r} of mode {part.name!r} is given both in the mode string "
                "and as a keyword; give it once."
            )
        options = {**part.options, **options}
        entry = self.entry(part.name)
        _check_options(entry, options)
        try:
            obj = entry.spec.factory(**options)
        except TypeError as exc:
            raise ModeOptionError(f"Mode {part.name!r} rejected its options: {exc}.") from None
        except MissingDependencyError:
            raise  # the plugin's own, clear error
        except ImportError as exc:
            missing = exc.name
            what = (f"cannot import {missing!r} ({exc})" if missing
                    else f"failed to import: {exc}")
            raise ModeFactoryError(
                f"Mode {part.name!r} of {entry.provider} cannot be built: its factory {what}; "
                "install the library that provides it, or reinstall the plugin with its "
                f"dependencies: pip install --force-reinstall {entry.provider}.",
                plugin=entry.provider, mode=part.name, missing=missing,
            ) from exc
        if not isinstance(obj, (PrecisionMode, OptimizerMode)):
            raise ModeFactoryError(
                f"Mode {part.name!r} of {entry.provider} cannot be built: its factory returned "
                f"{type(obj).__name__}, not a PrecisionMode or OptimizerMode; that is a bug in "
                f"{entry.provider}: upgrade it, or report it to its authors.",
                plugin=entry.provider, mode=part.name, missing=None,
            )
        if not getattr(obj, "name", ""):
            obj.name = part.name
        return obj


def _failure(exc: BaseException) -> str:
    """``exc`` from a plugin's import or hook as a reason for :meth:`Registry.broken`.

    Any exception counts, ``SystemExit`` from a ``sys.exit()`` at import included: a
    plugin must not end the program that merely lists or looks up modes. Only
    ``KeyboardInterrupt`` goes on, since that is the user stopping the program.
    """
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    return f"{type(exc).__name__}: {exc}"


def _version(dist: Any) -> str:
    """An entry point's distribution version ("?" where importlib knows no distribution)."""
    return str(dist.version) if dist is not None else "?"


def _check_spec(spec: object) -> None:
    if not isinstance(spec, ModeSpec):
        raise TypeError(f"expected ModeSpec objects, got {type(spec).__name__}")
    if not NAME_RE.match(spec.name):
        raise ValueError(f"invalid mode name {spec.name!r}")
    if spec.kind not in ("precision", "optimizer"):
        raise ValueError(f"mode {spec.name!r} has unknown kind {spec.kind!r}")
    unknown = sorted(str(t) for t in spec.tags if t not in TAGS)
    if unknown:
        raise ValueError(f"mode {spec.name!r} has unknown tags {unknown}; known: {sorted(TAGS)}")


def _check_options(entry: ModeEntry, options: dict[str, Any]) -> None:
    if not options:
        return
    try:
        params = inspect.signature(entry.spec.factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ModeOptionError(
                f"Mode {entry.name!r} does not take option {key!r}.{hint} "
                f"Its options: {', '.join(accepted) or 'none'}."
            )


def _split(mode: Any) -> list[Any]:
    if isinstance(mode, str):
        return list(parse_mode_string(mode))
    if isinstance(mode, (PrecisionMode, OptimizerMode)):
        return [mode]
    if isinstance(mode, (list, tuple)) and mode:
        out: list[Any] = []
        for item in mode:
            out.extend(_split(item))
        return out
    raise ModeSyntaxError(
        f"Cannot use {mode!r} as a mode; pass a mode string such as 'bf16-mixed', a mode "
        "object, or a list of them.",
        spec=repr(mode),
    )


def _describe(mode: Any) -> str:
    if isinstance(mode, str):
        return mode
    parts = mode if isinstance(mode, (list, tuple)) else [mode]
    return "+".join(p if isinstance(p, str) else getattr(p, "name", type(p).__name__) for p in parts)


_current = Registry()


def registry() -> Registry:
    """The registry mixprec uses now."""
    return _current


@contextlib.contextmanager
def use_registry(reg: Registry) -> Iterator[Registry]:
    """Use ``reg`` inside the block (tests: a fresh registry per test)."""
    global _current
    previous, _current = _current, reg
    try:
        yield reg
    finally:
        _current = previous
