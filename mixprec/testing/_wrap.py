"""Conformance checks of registration, summaries, atomic ``wrap`` and clear errors
(PYTEST_DONT_REWRITE: the kit raises its own messages)."""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import pytest
import torch

import mixprec
from mixprec.exceptions import MixprecError, ModeOptionError

from ._base import (
    _UNKNOWN_OPTION,
    ConformanceBase,
    _fail_after,
    _FailingOptimizerMode,
    _InjectedFailure,
    _listing,
    _raw,
)
from ._helpers import (
    Snapshot,
    entry_point_imports,
    entry_point_module,
    is_plain,
    requirement_modules,
    valid_name,
)

__all__ = ["WrapChecks"]


class WrapChecks(ConformanceBase):
    """Checks around ``wrap``: registration and summary, atomicity, option errors."""

    # -- registration and summary ---------------------------------------------------------

    def test_mode_is_registered_with_a_summary(self) -> None:
        """Each named mode is registered, with a one-line summary, a valid name, a
        kind that matches the object its factory builds, and plain options."""
        with self._session() as reg:
            precision = self._precision()
            objects: list[Any] = [precision.precision_mode, *precision.optimizer_modes]
            mode = _raw(type(self), "mode")
            parts = mode.split("+") if isinstance(mode, str) else [o.name for o in objects]
            modes, broken = reg.modes(), reg.broken()
            for obj in objects:
                if not (isinstance(obj.name, str) and valid_name(obj.name)):
                    raise self._violation(
                        "registration", f"{type(obj).__name__}.name is {obj.name!r}.",
                        "Give the mode class a lower-case `name` matching [a-z0-9][a-z0-9._-]* "
                        "(the name users type; '+' joins modes in a mode string).")
                if not isinstance(obj.describe(), str) or not obj.describe().startswith(obj.name):
                    raise self._violation(
                        "registration", f"describe() returned {obj.describe()!r}.",
                        "Let describe() start with the mode's name (the default does).")
                if not is_plain(obj.options()):
                    raise self._violation(
                        "registration", f"options() returned {obj.options()!r}, which holds "
                        "values that are not plain Python.",
                        "Report options as None/bool/int/float/str and lists or dicts of them "
                        "(a dtype as 'bfloat16'): checkpoints store them and load with "
                        "weights_only=True.")
            for part in parts:
                if part not in modes and not isinstance(mode, str):
                    continue  # a mode object that is not registered: nothing to look up
                if part not in modes:
                    reasons = [f"{k}: {v}" for k, v in broken.items()]
                    raise self._violation(
                        "registration", f"mode {part!r} is not registered"
                        + (f" (broken plugins: {_listing(reasons)})." if reasons else "."),
                        "Install the plugin's distribution (pip install -e .) so its "
                        "[project.entry-points.mixprec] entry point is found, or set `plugin` "
                        "on the test class to the module holding the mixprec_modes hookimpl.")
                spec = modes[part].spec
                obj = next((o for o in objects if o.name == part), None)
                if obj is None:
                    built = [o.name for o in objects]
                    raise self._violation(
                        "registration", f"the factory of {part!r} built modes named {built}.",
                        "Set the mode object's `name` to the registered name (or leave it empty: "
                        "the registry fills it in), so checkpoints record the name users type.")
                kind_ok = isinstance(obj, mixprec.PrecisionMode if spec.kind == "precision"
                                     else mixprec.OptimizerMode)
                if not kind_ok:
                    raise self._violation(
                        "registration", f"{part!r} is registered with kind={spec.kind!r} but its "
                        f"factory builds a {type(obj).__name__}.",
                        "Use kind='precision' for PrecisionMode subclasses and kind='optimizer' "
                        "for OptimizerMode subclasses.")
                if not (isinstance(spec.summary, str) and spec.summary.strip()
                        and "\n" not in spec.summary):
                    raise self._violation(
                        "registration", f"the summary of {part!r} is {spec.summary!r}.",
                        "Give ModeSpec a one-line summary: `mixprec modes` prints it.")
                if not (isinstance(spec.api_version, int)
                        and 1 <= spec.api_version <= mixprec.PLUGIN_API_VERSION):
                    raise self._violation(
                        "registration", f"{part!r} has api_version={spec.api_version!r}; this "
                        f"mixprec has plugin API {mixprec.PLUGIN_API_VERSION}.",
                        "Set ModeSpec.api_version to the mixprec.PLUGIN_API_VERSION the mode was "
                        "written for.")
                self._check_options_round_trip(part, obj)
                self._check_entry_point_name(modes[part].provider)

    def _check_options_round_trip(self, part: str, obj: Any) -> None:
        try:
            rebuilt = mixprec.PrecisionWrapper(part, **obj.options())
        except MixprecError as exc:
            raise self._violation(
                "registration", f"{part!r} does not accept its own options() {obj.options()!r}: "
                f"{exc}", "Return from options() exactly the keyword options the factory takes: "
                "a checkpoint records them to rebuild the mode.") from None
        built: list[mixprec.PrecisionMode | mixprec.OptimizerMode] = [
            rebuilt.precision_mode, *rebuilt.optimizer_modes]
        again = next((o for o in built if o.name == part), None)
        if again is None or again.options() != obj.options():
            got = None if again is None else again.options()
            raise self._violation(
                "registration", f"rebuilding {part!r} from options() {obj.options()!r} reports "
                f"{got!r}.", "Make options() report every non-default option, as the factory "
                "takes it.")

    def _check_entry_point_name(self, provider: str) -> None:
        if self.plugin is not None or provider == "mixprec":
            return
        if entry_point_module(provider) is None:
            raise self._violation(
                "registration", f"distribution {provider!r} has no entry point named after it "
                "in the 'mixprec' group.",
                f"Declare [project.entry-points.mixprec] {provider} = \"your_package.plugin\" "
                "(the entry-point name is the distribution name; pluggy silently skips a second "
                "entry point of the same name).")

    def test_entry_point_module_is_cheap(self) -> None:
        """Importing the plugin's module and calling its hook imports no heavy library."""
        with self._session() as reg:
            modules: dict[str, list[str]] = {}
            if isinstance(self.plugin, ModuleType):
                modules[self.plugin.__name__] = list(self.heavy_imports)
            elif self.plugin is None and isinstance(self.mode, str):
                for part in self.mode.split("+"):
                    provider = reg.entry(part).provider
                    module = None if provider == "mixprec" else entry_point_module(provider)
                    if module is not None:
                        modules[module] = [*requirement_modules(provider), *self.heavy_imports]
            modules = {m: heavy for m, heavy in modules.items() if heavy}
            if not modules:
                pytest.skip("no plugin module with heavy requirements to check (core modes, or "
                            "set `heavy_imports`)")
            for module, heavy in modules.items():
                imported = entry_point_imports(module)
                found = sorted({h for h in heavy for m in imported
                                if m == h or m.startswith(h + ".")})
                if found:
                    raise self._violation(
                        "registration", f"importing {module} and calling its mixprec_modes() "
                        f"imported {', '.join(found)}.",
                        "Import the heavy library inside the mode factory or the mode's methods: "
                        "the registry loads every plugin's module on first use, so `mixprec "
                        "modes` must stay fast and a missing library may break only its modes.")

    def test_summary_shows_what_the_mode_changed(self) -> None:
        """``convert_module`` returns summary lines for what it changed; they reach
        ``precision.summary`` and the ``mixprec`` logger."""
        with self._session():
            torch.manual_seed(0)
            model = self._model()
            opt = self.make_optimizer(model)
            before = Snapshot.take(model, None)
            precision = self._precision()
            returned: list[Any] = []
            original = precision.precision_mode.convert_module

            def capture(module: torch.nn.Module) -> Any:
                lines = original(module)
                returned.append(lines)
                return lines

            precision.precision_mode.convert_module = capture  # type: ignore[method-assign]
            records: list[logging.LogRecord] = []
            handler = logging.Handler(logging.INFO)
            handler.emit = records.append  # type: ignore[method-assign, assignment]
            logger = logging.getLogger("mixprec")
            old_level = logger.level
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            try:
                _, wopt = precision.wrap(model, opt)
            finally:
                logger.removeHandler(handler)
                logger.setLevel(old_level)
            lines = returned[0]
            if not (isinstance(lines, list) and all(isinstance(x, str) and x.strip() for x in lines)):
                raise self._violation(
                    "honest conversions", f"convert_module() returned {lines!r}.",
                    "Return a list of non-empty strings, one per kind of change "
                    "('cast 4 parameters to torch.bfloat16').")
            changes = before.differences(model, None)
            if changes and not lines:
                raise self._violation(
                    "honest conversions", "convert_module() changed the model "
                    f"({_listing(changes, 4)}) but returned no summary lines.",
                    "Return a line for each kind of change (layers swapped, weights frozen or "
                    "quantized, parameters cast) so users see it in precision.summary and the log.")
            summary = wopt.precision.summary
            if not all(line in summary for line in lines):
                raise self._violation(
                    "honest conversions", "precision.summary misses lines convert_module() "
                    "returned.", "Return the lines from convert_module(); do not print them.")
            if not any(summary in r.getMessage() for r in records):
                raise self._violation(
                    "honest conversions", "wrap() logged no line with the summary to the "
                    "'mixprec' logger.", "Let the wrapper log (do not replace the 'mixprec' "
                    "logger's handlers or level inside the mode).")

    # -- atomic wrap ---------------------------------------------------------------------------

    def _check_rollback(self, precision: mixprec.PrecisionWrapper, stage: str) -> None:
        model, opt = self._prepared_pair()
        snapshot = Snapshot.take(model, opt)
        try:
            precision.wrap(model, opt)
        except _InjectedFailure:
            pass
        else:
            raise self._violation(
                "atomic wrap", f"wrap() returned although {stage} raised.",
                "Do not catch exceptions inside convert_module()/convert_optimizer(): let them "
                "reach wrap() so it can roll back and report them.")
        diffs = snapshot.differences(model, opt)
        if diffs:
            raise self._violation(
                "atomic wrap", f"wrap() raised (injected failure after {stage}) but left the "
                f"model or optimizer changed: {_listing(diffs)}.",
                "Raise predictable errors from validate() before anything changes. In "
                "convert_module() change the model only in ways mixprec's rollback restores: "
                "assign new tensors (p.data = p.data.to(dtype)) or new submodules/parameters "
                "instead of writing into existing tensors in place, and keep state the model "
                "refers to inside the model (module attributes, buffers), not in objects "
                "shared with anything else.")
        if mixprec.is_wrapped(model):
            raise self._violation(
                "atomic wrap", "after the failed wrap() the model still counts as wrapped.",
                "Leave registration of the wrapped module to the wrapper.")
        opt.zero_grad()
        try:
            model, opt = self._precision().wrap(model, opt)
            self._train(model, opt, 1)
        except Exception as exc:
            if not self._wraps_a_stepped_optimizer():
                return  # not about the failed attempt: test_an_optimizer_with_state_... reports it
            raise self._violation(
                "atomic wrap", f"after a failed wrap() the model cannot be wrapped and trained "
                f"again: {type(exc).__name__}: {exc}",
                "Keep the mode's own bookkeeping in objects created per wrap (not in "
                "module-level state) so a failed attempt leaves nothing behind.", cause=exc) from exc

    def _wraps_a_stepped_optimizer(self) -> bool:
        model, opt = self._prepared_pair()
        opt.zero_grad()
        try:
            model, opt = self._precision().wrap(model, opt)
            self._train(model, opt, 1)
        except Exception:
            return False
        return True

    def test_an_optimizer_with_state_can_be_wrapped(self) -> None:
        """A model and optimizer that already trained (the optimizer has state) can
        be wrapped and train on: the state follows its parameter to the dtype the
        optimizer steps in. Where :attr:`wraps_stepped_optimizer` is False, wrapping
        one is refused with a clear error before anything changes."""
        with self._session():
            torch.manual_seed(0)
            model = self._model()
            opt = self.make_optimizer(model)
            self.compute_loss(model, self.make_batch(0)).backward()
            opt.step()
            opt.zero_grad()
            if not self.wraps_stepped_optimizer:
                self._check_refused(model, opt, self._precision, MixprecError,
                                    "an optimizer that already stepped")
                return
            try:
                model, opt = self._precision().wrap(model, opt)
                self._train(model, opt, 2)
            except Exception as exc:
                raise self._violation(
                    "training", "after one plain optimizer step, the wrapped pair fails to train: "
                    f"{type(exc).__name__}: {exc}",
                    "Existing optimizer state must follow a converted parameter: keep the "
                    "parameter object (p.data = ...) or replace it at the same dotted name, and "
                    "make sure the state's dtype is the one the optimizer steps in (cast it in "
                    "convert_optimizer() or optimizer_step_context()). If the mode cannot take "
                    "over existing state, refuse it in validate() and set "
                    "wraps_stepped_optimizer = False on the test class.", cause=exc) from exc
            self._check_finite(model, opt, "after wrapping a stepped optimizer and two steps")

    def test_wrap_is_atomic_when_convert_module_fails(self) -> None:
        """A failure after ``convert_module`` leaves values, dtypes, parameter
        objects, modules and optimizer state exactly as before."""
        with self._session():
            precision = self._precision()
            _fail_after(precision.precision_mode, "convert_module")
            self._check_rollback(precision, "convert_module()")

    def test_wrap_is_atomic_when_optimizer_conversion_fails(self) -> None:
        """A failure at the last step of ``wrap`` (after the optimizer remap, master
        weights and optimizer modes) rolls everything back too."""
        with self._session():
            precision = self._precision()
            if precision.optimizer_modes:
                _fail_after(precision.optimizer_modes[-1], "convert_optimizer")
                stage = "convert_optimizer()"
            else:
                precision = mixprec.PrecisionWrapper(
                    [precision.precision_mode, _FailingOptimizerMode()])
                stage = "the optimizer remap and master weights"
            self._check_rollback(precision, stage)

    # -- clear errors --------------------------------------------------------------------------

    def test_bad_options_are_clear_errors_raised_before_any_change(self) -> None:
        """Bad options fail with a :class:`mixprec.MixprecError` from the factory or
        ``validate()``, before the model or optimizer changes."""
        cases = list(self.bad_options)
        if isinstance(self.mode, str):
            cases.append(({_UNKNOWN_OPTION: 1}, ModeOptionError))
        if not cases:
            pytest.skip("no bad_options to check for a mode given as a factory")
        with self._session():
            for options, error in cases:
                self._check_bad_option(options, error)

    def _check_bad_option(self, options: Any, error: type[BaseException]) -> None:
        what = options if not callable(options) else getattr(options, "__name__", "factory")
        if not callable(options) and not isinstance(self.mode, str):
            raise TypeError(f"{type(self).__name__}.bad_options: a mode given as a factory takes "
                            "(callable building a badly configured mode, error) pairs.")

        def build() -> mixprec.PrecisionWrapper:
            if callable(options):
                return mixprec.PrecisionWrapper(options())
            return mixprec.PrecisionWrapper(self.mode, **{**self.options, **options})

        model, opt = self._prepared_pair()
        self._check_refused(model, opt, build, error, f"options {what!r}",
                            unknown_option=isinstance(options, dict) and _UNKNOWN_OPTION in options)
