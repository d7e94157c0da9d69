"""A conformance kit for mode authors: does a mode keep mixprec's contracts?

Opt in from the top-level ``conftest.py`` of a plugin's tests (the kit is never
loaded into other pytest runs; there is no ``pytest11`` entry point)::

    pytest_plugins = ["mixprec.testing"]

and subclass :class:`ModeConformance` in a test module::

    from mixprec.testing import ModeConformance

    class TestMyMode(ModeConformance):
        mode = "my-mode"              # or a callable returning a mode object
        options = {"group_size": 64}  # options of a string mode

Each inherited ``test_*`` method checks one contract: registration and
summary, atomic ``wrap`` on a failing conversion, no inf/NaN in weights or
optimizer state after an overflowing step, exact checkpoint resume, output
dtypes, the ``init_module`` dtype, ``deepcopy``/``pickle``/``torch.save``, clear
errors on bad options, a cheap entry-point module, ``unwrap``. A broken
contract fails with a :class:`ContractViolation` saying which contract broke
and how to fix it.

Fixtures, once the plugin is opted in: ``mixprec_registry`` (a fresh registry
with only the core modes, in use for the test) and ``register_mixprec_plugin``
(register a plugin object into it; unregistered after the test, also on failure).

The kit raises its own messages, so pytest need not rewrite its asserts
(PYTEST_DONT_REWRITE; this also keeps pytest quiet when the module was imported
before the plugin was loaded).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import pickle
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any, ClassVar

import pytest
import torch

import mixprec
from mixprec.exceptions import CheckpointError, MixprecError, ModeOptionError

from ._conformance import (
    CONTRACTS,
    ConformanceNet,
    Snapshot,
    all_finite,
    clone_nested,
    default_batch,
    entry_point_imports,
    entry_point_module,
    float_tensors,
    is_plain,
    nested_differences,
    requirement_modules,
    valid_name,
)

__all__ = [
    "CONTRACTS",
    "ConformanceNet",
    "ContractViolation",
    "ModeConformance",
    "mixprec_registry",
    "register_mixprec_plugin",
]

_UNKNOWN_OPTION = "mixprec_conformance_no_such_option"


# -- fixtures (available with pytest_plugins = ["mixprec.testing"]) -------------------------


@pytest.fixture
def mixprec_registry() -> Iterator[mixprec.Registry]:
    """A fresh registry holding only the core modes, in use for the test."""
    with mixprec.use_registry(mixprec.Registry(entry_points=False)) as reg:
        yield reg


@pytest.fixture
def register_mixprec_plugin(mixprec_registry: mixprec.Registry) -> Iterator[Callable[..., str]]:
    """``register(plugin, name=None, **kw) -> name``: register a plugin object into
    the test's fresh registry; every plugin is unregistered after the test."""
    names: list[str] = []

    def register(plugin: object, name: str | None = None, **kwargs: Any) -> str:
        registered = mixprec_registry.register(plugin, name=name, **kwargs)
        names.append(registered)
        return registered

    try:
        yield register
    finally:
        for name in reversed(names):
            mixprec_registry.unregister(name)


# -- the conformance suite -------------------------------------------------------------------


class ContractViolation(pytest.fail.Exception):  # type: ignore[misc,name-defined]
    """A mode broke one of mixprec's contracts (a pytest failure).

    pytest shows only the message (which says what broke and how to fix it),
    unless the violation was caused by an exception in the mode, whose traceback
    is then shown too.

    :ivar contract: the contract's name (a key of :data:`CONTRACTS`).
    :ivar problem: what was observed.
    :ivar fix: what the mode's author should change.
    :ivar mode: the mode under test, as given to ``wrap``.
    """

    def __init__(
        self, contract: str, problem: str, fix: str, *, mode: str = "",
        cause: BaseException | None = None,
    ) -> None:
        self.contract = contract
        self.problem = problem
        self.fix = fix
        self.mode = mode
        by = f" by mode {mode!r}" if mode else ""
        message = (f"mixprec contract '{contract}' ({CONTRACTS.get(contract, '')}) broken{by}: "
                   f"{problem.rstrip()} Fix: {fix.rstrip()}")
        super().__init__(message, pytrace=cause is not None)


def _adamw(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)


class _InjectedFailure(RuntimeError):
    """Raised by the kit inside ``wrap`` to test rollback."""


class _FailingOptimizerMode(mixprec.OptimizerMode):
    name = "conformance-failure"

    def convert_optimizer(self, optimizer: Any, module: Any, param_names: Any) -> Any:
        raise _InjectedFailure("conformance kit: injected failure in convert_optimizer()")


def _fail_after(obj: object, method: str) -> None:
    """Make ``obj.method`` raise after doing its work (an instance attribute)."""
    original = getattr(obj, method)

    def failing(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        raise _InjectedFailure(f"conformance kit: injected failure after {method}()")

    setattr(obj, method, failing)


def _raw(cls: type, name: str) -> Any:
    """A class attribute as written (a function stays unbound, staticmethod unwrapped)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            value = vars(klass)[name]
            return value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
    raise AttributeError(name)


def _listing(items: list[str], limit: int = 6) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; … ({len(items) - limit} more)" if len(items) > limit else "")


class ModeConformance:
    """Subclass as ``TestSomething`` to run every contract check against one mode.

    Configure with class attributes; override the ``make_*``/``compute_loss``
    methods when the mode needs another model or data.
    """

    #: The mode under test: a mode string (``"nf4-dq+adamw8bit"``), or a callable
    #: taking no arguments that returns a mode object or a list of them (a fresh
    #: one is built for every wrap).
    mode: ClassVar[Any] = ""
    #: Options of a string mode: ``wrap(model, opt, mode, **options)``.
    options: ClassVar[dict[str, Any]] = {}
    #: A plugin object (usually the module holding the ``mixprec_modes`` hookimpl)
    #: registered by hand into a fresh registry for each check. None: the mode is
    #: looked up in the registry in use (installed distributions, via entry points).
    plugin: ClassVar[object | None] = None
    #: Builds the float32 model the checks wrap (no arguments). The default takes
    #: ``(16, 32)`` inputs; with another model, override :meth:`make_batch` too.
    model_factory: ClassVar[Callable[[], torch.nn.Module]] = ConformanceNet
    #: Builds the optimizer from the model's parameters.
    optimizer_factory: ClassVar[Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]] = _adamw
    #: Device of the model and data; checks skip where it is not available.
    device: ClassVar[str] = "cpu"
    #: The loss must fall during a short training run (False for modes that
    #: freeze every parameter).
    trainable: ClassVar[bool] = True
    #: Resuming from a checkpoint is bit-identical to never stopping. False
    #: (non-deterministic kernels) compares with ``resume_tolerance`` instead.
    exact_resume: ClassVar[bool] = True
    #: ``(rtol, atol)`` for resume when ``exact_resume`` is False.
    resume_tolerance: ClassVar[tuple[float, float]] = (1e-3, 1e-5)
    #: dtype of the model's floating-point outputs; None leaves it unchecked.
    output_dtype: ClassVar[torch.dtype | None] = torch.float32
    #: Largest ``‖out - ref‖ / ‖ref‖`` against the unwrapped fp32 model.
    max_output_error: ClassVar[float] = 0.1
    #: dtype of floating-point parameters built under ``mixprec.init_module``;
    #: None: the mode's ``param_dtype``, else float32.
    init_dtype: ClassVar[torch.dtype | None] = None
    #: ``init_module(mode, device="meta")``, ``load_state_dict(fp32, assign=True)``,
    #: then wrap works.
    supports_meta_init: ClassVar[bool] = True
    #: A plain fp32 state dict loads into the wrapped model (False: the mode refuses
    #: it with a ``CheckpointError``).
    loads_plain_state_dict: ClassVar[bool] = True
    #: ``[(options or mode factory, error class), ...]``: each must fail with that
    #: :class:`mixprec.MixprecError` before anything changes. For a string mode an
    #: unknown option is always checked too.
    bad_options: ClassVar[list[tuple[Any, type[BaseException]]]] = []
    #: Wrapping a model whose optimizer already stepped works (its state follows
    #: the parameters). False for modes that refuse it (with a clear error).
    wraps_stepped_optimizer: ClassVar[bool] = True
    #: Modules (``"bitsandbytes"``, ``"my_plugin._kernels"``) that importing the
    #: entry-point module and calling its hook must not import; the installed
    #: distribution's own requirements (other than mixprec and torch) are added.
    heavy_imports: ClassVar[tuple[str, ...]] = ()
    #: Optimizer steps of the training checks, and micro-batches per step.
    train_steps: ClassVar[int] = 10
    accumulate: ClassVar[int] = 2

    # -- what the checks build (override as needed) ------------------------------------------

    def make_model(self) -> torch.nn.Module:
        """A fresh float32 model (on the default device: the kit moves it to
        :attr:`device`, and builds it under ``init_module`` in the init checks)."""
        return _raw(type(self), "model_factory")()

    def _model(self) -> torch.nn.Module:
        return self.make_model().to(self.device)

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return _raw(type(self), "optimizer_factory")(model.parameters())

    def make_batch(self, index: int) -> tuple[Any, torch.Tensor]:
        """``(inputs, target)`` number ``index`` (deterministic, a few distinct ones)."""
        x, y = default_batch(index, 16, 32)
        return x.to(self.device), y.to(self.device)

    def compute_loss(self, model: torch.nn.Module, batch: tuple[Any, torch.Tensor]) -> torch.Tensor:
        inputs, target = batch
        out = model(inputs)
        return torch.nn.functional.mse_loss(out.float(), target.float())

    def mode_label(self) -> str:
        """The mode as shown in failure messages."""
        mode = self.mode
        if isinstance(mode, str):
            opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
            return f"{mode}({opts})" if opts else mode
        return getattr(mode, "__name__", repr(mode))

    # -- plumbing ------------------------------------------------------------------------------

    def _mode_arg(self) -> Any:
        mode = _raw(type(self), "mode")
        if isinstance(mode, str):
            if not mode:
                raise TypeError(f"{type(self).__name__} must set `mode` (a mode string or a "
                                "callable returning a mode object).")
            return mode
        if not callable(mode):
            raise TypeError(f"{type(self).__name__}.mode must be a string or a callable.")
        if self.options:
            raise TypeError(f"{type(self).__name__}: `options` apply to string modes only; pass "
                            "them to the mode's constructor in the `mode` callable.")
        return mode()

    def _precision(self, **extra: Any) -> mixprec.PrecisionWrapper:
        mode = self._mode_arg()
        if isinstance(mode, str):
            return mixprec.PrecisionWrapper(mode, **{**self.options, **extra})
        return mixprec.PrecisionWrapper(mode, **extra)

    def _violation(
        self, contract: str, problem: str, fix: str, cause: BaseException | None = None,
    ) -> ContractViolation:
        return ContractViolation(contract, problem, fix, mode=self.mode_label(), cause=cause)

    @contextlib.contextmanager
    def _session(self) -> Iterator[mixprec.Registry]:
        """The registry for one check (fresh, with :attr:`plugin`, if one is set)."""
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            pytest.skip(f"{type(self).__name__} runs on {self.device}, which is not available")
        plugin = self.plugin
        if plugin is None:
            yield mixprec.registry()
            return
        with mixprec.use_registry(mixprec.Registry(entry_points=False)) as reg:
            name = reg.register(plugin)
            try:
                yield reg
            finally:
                reg.unregister(name)

    def _wrapped(self, seed: int = 0) -> tuple[Any, Any]:
        torch.manual_seed(seed)
        model = self._model()
        return self._precision().wrap(model, self.make_optimizer(model))

    def _train(self, model: Any, opt: Any, steps: int, start: int = 0) -> list[float]:
        losses = []
        for step in range(start, start + steps):
            for micro in range(self.accumulate):
                batch = self.make_batch(step * self.accumulate + micro)
                loss = self.compute_loss(model, batch) / self.accumulate
                if loss.requires_grad:  # False when the mode froze every parameter
                    opt.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()) * self.accumulate)
        return losses

    def _eval_loss(self, model: Any) -> float:
        with torch.no_grad():
            return sum(float(self.compute_loss(model, self.make_batch(i))) for i in range(4)) / 4

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
        built = [rebuilt.precision_mode, *rebuilt.optimizer_modes]
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
            handler.emit = records.append  # type: ignore[method-assign]
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

    def _prepared_pair(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """A plain model and optimizer after one backward (parameters have gradients)
        and, where :attr:`wraps_stepped_optimizer`, one step (the optimizer has state)."""
        torch.manual_seed(0)
        model = self._model()
        opt = self.make_optimizer(model)
        self.compute_loss(model, self.make_batch(0)).backward()
        if self.wraps_stepped_optimizer:
            opt.step()
        return model, opt

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
                "instead of writing into existing tensors in place; keep layer state in "
                "registered buffers or submodules, not new plain attributes.")
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

    # -- no poisoned weights -------------------------------------------------------------------

    def test_overflow_step_is_skipped_without_poisoning(self) -> None:
        """A step whose gradients are inf/NaN (loss * inf) is skipped: weights and
        optimizer state stay bit-identical and finite, the scale backs off."""
        with self._session():
            model, opt = self._wrapped()
            self._train(model, opt, 2)
            params = clone_nested(dict(model.named_parameters()))
            steps = clone_nested([p for g in opt.param_groups for p in g["params"]])
            state = clone_nested(opt.state_dict()["state"])
            scale, skipped = opt.precision.loss_scale, opt.precision.skipped_steps
            loss = self.compute_loss(model, self.make_batch(0)) * math.inf
            opt.backward(loss)
            opt.step()
            opt.zero_grad()
            if opt.precision.skipped_steps != skipped + 1:
                raise self._violation(
                    "no poisoned weights", "a step with inf/NaN gradients was not skipped.",
                    "Let the wrapper step the optimizer: an optimizer mode must return a "
                    "torch.optim.Optimizer whose step() the wrapper calls, and never step by itself.")
            diffs = (nested_differences(params, dict(model.named_parameters()), "model")
                     + nested_differences(steps, [p for g in opt.param_groups for p in g["params"]],
                                          "optimizer params")
                     + nested_differences(state, opt.state_dict()["state"], "optimizer state"))
            if diffs:
                raise self._violation(
                    "no poisoned weights", f"the skipped step changed {_listing(diffs)}.",
                    "Change weights and optimizer state only inside the optimizer's step() (or "
                    "optimizer_step_context()), which the wrapper does not enter on a skipped step.")
            self._check_finite(model, opt, "after the skipped step")
            if scale is not None and "hysteresis" not in self.options and not (
                    opt.precision.loss_scale < scale):
                raise self._violation(
                    "no poisoned weights", f"the loss scale stayed at {opt.precision.loss_scale:g} "
                    "after an overflow.", "Return a mixprec.LossScaler from create_scaler() and "
                    "leave its update to the wrapper.")
            self._train(model, opt, 2, start=3)
            self._check_finite(model, opt, "two steps after the skipped one")

    def _check_finite(self, model: Any, opt: Any, when: str) -> None:
        bad = (all_finite({"model": model.state_dict()})
               + all_finite({"optimizer": opt.state_dict()["state"]})
               + all_finite({"buffers": dict(model.named_buffers())}))
        if bad:
            raise self._violation(
                "no poisoned weights", f"inf/NaN {when} in {_listing(bad)}.",
                "State updated during forward/backward (amax histories, running statistics) "
                "must ignore non-finite values or be updated only in a step that was not skipped.")

    # -- exact resume --------------------------------------------------------------------------

    def test_resume_is_exact(self) -> None:
        """Training 2+2 steps with a checkpoint in between (loaded with
        ``weights_only=True`` into a fresh wrap of another model) equals 4 steps."""
        with self._session():
            model, opt = self._wrapped(seed=0)
            self._train(model, opt, 4)
            expected_model = clone_nested(model.state_dict())
            expected_opt = clone_nested(opt.state_dict())
            expected_scale = opt.precision.loss_scale

            model, opt = self._wrapped(seed=0)
            self._train(model, opt, 2)
            buffer = io.BytesIO()
            torch.save(opt.precision.state_dict(), buffer)
            buffer.seek(0)
            try:
                checkpoint = torch.load(buffer, weights_only=True)
            except Exception as exc:
                raise self._violation(
                    "exact resume", f"the checkpoint does not load with weights_only=True: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
                    "Keep only tensors and plain Python values in options(), state_dict() and "
                    "module_state_dict() (no custom classes, dtypes as strings).") from exc

            model, opt = self._wrapped(seed=1)  # other initial weights: the load must overwrite
            try:
                opt.precision.load_state_dict(checkpoint)
            except Exception as exc:
                raise self._violation(
                    "exact resume", "the checkpoint of a wrapped pair does not load into a fresh "
                    f"wrap of the same mode: {type(exc).__name__}: {exc}",
                    "Load what module_state_dict()/state_dict() saved in load_module_state_dict()/"
                    "load_state_dict().", cause=exc) from exc
            self._train(model, opt, 2, start=2)
            rtol, atol = (0.0, 0.0) if self.exact_resume else self.resume_tolerance
            diffs = nested_differences(expected_model, model.state_dict(), "model",
                                       exact=self.exact_resume, rtol=rtol, atol=atol)
            diffs += nested_differences(expected_opt, opt.state_dict(), "optimizer",
                                        exact=self.exact_resume, rtol=rtol, atol=atol)
            if opt.precision.loss_scale != expected_scale:
                diffs.append(f"loss scale {opt.precision.loss_scale} instead of {expected_scale}")
            if diffs:
                how = "bit-identical" if self.exact_resume else f"within rtol={rtol}, atol={atol}"
                raise self._violation(
                    "exact resume", f"resuming from a checkpoint is not {how} to training on: "
                    f"{_listing(diffs)}.",
                    "Put everything that affects later steps into the checkpoint and restore all "
                    "of it on load: the mode's own state (RNG generators, step counters, scaling "
                    "history) in PrecisionMode.state_dict()/load_state_dict(), layer state "
                    "(quantization constants, amax) in module_state_dict()/"
                    "load_module_state_dict(), weights at full precision. Use your own "
                    "torch.Generator, not the global RNG.")

    # -- outputs and building --------------------------------------------------------------------

    def test_outputs_have_the_documented_dtype_and_values(self) -> None:
        """Outputs come back in :attr:`output_dtype` and close to the fp32 model's."""
        with self._session():
            torch.manual_seed(0)
            reference = self._model()
            inputs, _ = self.make_batch(0)
            with torch.no_grad():
                ref_out = float_tensors(reference(inputs))
            model, _ = self._wrapped(seed=0)
            with torch.no_grad():
                out = float_tensors(model(inputs))
            dtypes = sorted({str(t.dtype) for t in out})
            if self.output_dtype is not None and any(t.dtype != self.output_dtype for t in out):
                raise self._violation(
                    "output dtype", f"the wrapped model returned {', '.join(dtypes)} outputs, "
                    f"expected {self.output_dtype}.",
                    "Convert outputs back in convert_output() (mixprec.apply_to_float_tensors(data, "
                    "lambda t: t.float())), or set output_dtype on the test class if the mode "
                    "documents other outputs (keep_output_dtype=True).")
            if len(out) != len(ref_out):
                raise self._violation(
                    "output dtype", f"the wrapped model returned {len(out)} float tensors, the "
                    f"plain one {len(ref_out)}.", "Return outputs of the same structure.")
            for got, ref in zip(out, ref_out):
                error = float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12))
                if not error <= self.max_output_error:
                    raise self._violation(
                        "output dtype", f"outputs differ from the unwrapped fp32 model by "
                        f"{error:.3g} (relative norm), more than max_output_error="
                        f"{self.max_output_error}.",
                        "Check the conversion (scales, transposes, dequantization); raise "
                        "max_output_error on the test class only if the format's error is "
                        "really that large.")

    def _expected_init_dtype(self, precision: mixprec.PrecisionWrapper) -> torch.dtype:
        if self.init_dtype is not None:
            return self.init_dtype
        return precision.precision_mode.param_dtype or torch.float32

    def test_init_module_builds_in_the_modes_dtype(self) -> None:
        """Under ``mixprec.init_module(mode)`` models are built in the mode's dtype;
        the default dtype is restored after the block, also on errors."""
        with self._session():
            default = torch.get_default_dtype()
            mode = self._mode_arg()
            options = self.options if isinstance(mode, str) else {}
            with mixprec.init_module(mode, **options) as precision:
                model = self.make_model()
            expected = self._expected_init_dtype(precision)
            self._check_default_dtype(default, "after the init_module block")
            wrong = sorted({str(p.dtype) for p in model.parameters()
                            if p.is_floating_point() and p.dtype != expected})
            if wrong:
                raise self._violation(
                    "init_module", f"parameters built under init_module are {', '.join(wrong)}, "
                    f"expected {expected}.",
                    "Set the default dtype in init_context() (and restore it after), so the model "
                    "never exists in fp32; or set init_dtype on the test class.")
            model = model.to(self.device)
            wrapped, opt = precision.wrap(model, self.make_optimizer(model))
            self._train(wrapped, opt, 1)
            self._check_finite(wrapped, opt, "after building under init_module and one step")
            with contextlib.suppress(_InjectedFailure), mixprec.init_module(self._mode_arg(), **options):
                raise _InjectedFailure("inside the block")
            self._check_default_dtype(default, "after an error inside the init_module block")

    def _check_default_dtype(self, default: torch.dtype, when: str) -> None:
        if torch.get_default_dtype() != default:
            now = torch.get_default_dtype()
            torch.set_default_dtype(default)
            raise self._violation(
                "init_module", f"the default dtype is {now} {when}, was {default}.",
                "Restore the default dtype in a finally: block of init_context().")

    def _check_close_to(self, reference: torch.nn.Module, model: Any, contract: str, when: str,
                        fix: str) -> None:
        inputs, _ = self.make_batch(0)
        with torch.no_grad():
            ref = float_tensors(reference(inputs))
            got = float_tensors(model(inputs))
        for a, b in zip(got, ref):
            error = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))
            if not error <= self.max_output_error:
                raise self._violation(
                    contract, f"{when} the outputs differ from the fp32 model's by {error:.3g} "
                    f"(relative norm; max_output_error={self.max_output_error}).", fix)

    def test_init_module_on_meta_then_load(self) -> None:
        """``init_module(mode, device="meta")`` builds without memory; loading fp32
        weights with ``assign=True`` and wrapping gives the fp32 model's outputs."""
        if not self.supports_meta_init:
            pytest.skip("supports_meta_init = False on this test class")
        with self._session():
            torch.manual_seed(0)
            reference = self._model()
            mode = self._mode_arg()
            options = self.options if isinstance(mode, str) else {}
            with mixprec.init_module(mode, device="meta", **options) as precision:
                model = self.make_model()
            if not all(t.is_meta for t in (*model.parameters(), *model.buffers())):
                raise self._violation(
                    "init_module", "init_module(device='meta') built tensors that are not on "
                    "the meta device.", "Enter torch.device(device) in init_context().")
            try:
                model.load_state_dict(reference.state_dict(), assign=True)
                wrapped, _ = precision.wrap(model, self.make_optimizer(model))
            except Exception as exc:
                raise self._violation(
                    "init_module", "a model built on meta cannot load the fp32 model's state dict "
                    f"with assign=True and be wrapped: {type(exc).__name__}: {exc}",
                    "Let convert_module() take the loaded tensors as they are, or set "
                    "supports_meta_init = False on the test class.", cause=exc) from exc
            self._check_close_to(reference, wrapped, "init_module", "after building on meta, "
                                 "loading the fp32 weights and wrapping,",
                                 "Convert every loaded parameter and buffer in convert_module().")

    def test_a_plain_fp32_state_dict_loads_into_the_wrapped_model(self) -> None:
        """``model.load_state_dict(fp32_state)`` after wrap (pretrained weights) gives
        the fp32 model's outputs. Where :attr:`loads_plain_state_dict` is False it
        must be refused with a :class:`mixprec.exceptions.CheckpointError`."""
        with self._session():
            torch.manual_seed(0)
            reference = self._model()
            model, _ = self._wrapped(seed=1)
            try:
                model.load_state_dict(reference.state_dict())
            except Exception as exc:
                if not self.loads_plain_state_dict and isinstance(exc, CheckpointError):
                    return
                raise self._violation(
                    "exact resume", "a plain fp32 state dict does not load into the wrapped model: "
                    f"{type(exc).__name__}: {exc}",
                    "Convert plain weights in load_module_state_dict(); if the mode cannot, raise "
                    "mixprec.exceptions.CheckpointError saying what to load instead and set "
                    "loads_plain_state_dict = False on the test class.", cause=exc) from exc
            if not self.loads_plain_state_dict:
                raise self._violation(
                    "exact resume", "a plain fp32 state dict loaded although "
                    "loads_plain_state_dict = False.", "Set loads_plain_state_dict = True.")
            self._check_close_to(reference, model, "exact resume", "after loading the fp32 "
                                 "weights into the wrapped model,",
                                 "Load every parameter and buffer in load_module_state_dict(), "
                                 "including derived state (scales, quantized copies, masters).")

    # -- training, copies, unwrap ---------------------------------------------------------------

    def test_trains_and_the_optimizer_holds_the_trainable_parameters(self) -> None:
        """After wrap the optimizer steps every trainable parameter (or its fp32
        master) in the original groups, parameters have ``param_dtype``, and the loss falls."""
        with self._session():
            torch.manual_seed(0)
            model = self._model()
            opt = self.make_optimizer(model)
            groups = [(len(g["params"]), g.get("lr")) for g in opt.param_groups]
            model, opt = self._precision().wrap(model, opt)
            trainable = {id(p) for p in model.parameters() if p.requires_grad}
            stepped = [p for g in opt.param_groups for p in g["params"]]
            if len(opt.param_groups) != len(groups) or len(stepped) != len(trainable) or any(
                    g.get("lr") != lr for g, (_, lr) in zip(opt.param_groups, groups)):
                raise self._violation(
                    "training", f"after wrap the optimizer has {len(opt.param_groups)} groups "
                    f"and steps {len(stepped)} tensors; the model has {len(trainable)} trainable "
                    f"parameters and the optimizer had {len(groups)} groups.",
                    "Keep a replaced parameter at the same dotted name (it takes over the old "
                    "one's optimizer entry); an optimizer mode must return an optimizer with the "
                    "same parameters in the same groups, with their hyperparameters.")
            dtype = getattr(opt.precision.precision_mode, "param_dtype", None)
            wrong = [n for n, p in model.named_parameters()
                     if dtype is not None and p.is_floating_point() and p.dtype != dtype]
            if wrong:
                raise self._violation(
                    "training", f"param_dtype is {dtype} but {_listing(wrong, 4)} are not.",
                    "Return from param_dtype the dtype convert_module() stores floating-point "
                    "parameters in, or None if it varies.")
            before = self._eval_loss(model)
            self._train(model, opt, self.train_steps)
            after = self._eval_loss(model)
            self._check_finite(model, opt, f"after {self.train_steps} steps")
            if self.trainable and not after < 0.9 * before:
                raise self._violation(
                    "training", f"the loss went from {before:.4g} to {after:.4g} in "
                    f"{self.train_steps} steps (expected a fall of at least 10%).",
                    "Keep trainable parameters trainable and in the optimizer; or set trainable "
                    "= False on the test class if the mode freezes every parameter.")

    def test_deepcopy_pickle_and_torch_save(self) -> None:
        """The wrapped module survives ``copy.deepcopy``, ``pickle`` and ``torch.save``
        and computes the same outputs; a copy gets its own precision."""
        with self._session():
            model, opt = self._wrapped()
            self._train(model, opt, 1)
            inputs, _ = self.make_batch(0)
            with torch.no_grad():
                expected = float_tensors(model(inputs))

            def saved(m: Any) -> Any:
                buffer = io.BytesIO()
                torch.save(m, buffer)
                buffer.seek(0)
                return torch.load(buffer, weights_only=False)

            ways: list[tuple[str, Callable[[Any], Any]]] = [
                ("copy.deepcopy", copy.deepcopy), ("pickle", lambda m: pickle.loads(pickle.dumps(m))),
                ("torch.save/torch.load", saved)]
            for how, fn in ways:
                try:
                    other = fn(model)
                    with torch.no_grad():
                        got = float_tensors(other(inputs))
                    precision = other.precision
                except Exception as exc:
                    raise self._violation(
                        "copies", f"{how} of the wrapped model failed: {type(exc).__name__}: {exc}",
                        "Keep only picklable state on the mode object and its layers (no lambdas, "
                        "locks, open handles or library contexts); create such objects lazily or "
                        "drop them in __getstate__.", cause=exc) from exc
                diffs = nested_differences(expected, got, "outputs")
                if diffs:
                    raise self._violation(
                        "copies", f"the copy made by {how} computes other outputs: "
                        f"{_listing(diffs, 3)}.",
                        "Copy all of the mode's layer state with the module (quantization "
                        "constants, scales as buffers or parameters), and keep the forward free of "
                        "state held outside the module.")
                if precision is model.precision or (
                        precision.precision_mode.name != model.precision.precision_mode.name):
                    raise self._violation(
                        "copies", f"the copy made by {how} shares the original's precision or "
                        f"runs another mode ({precision.mode_name!r}).",
                        "Keep the mode object picklable and its name stable; the copy rebuilds its "
                        "own PrecisionWrapper from it.")

    def test_unwrap_gives_a_plain_module(self) -> None:
        """``mixprec.unwrap`` returns a plain module with finite parameters."""
        with self._session():
            model, opt = self._wrapped()
            self._train(model, opt, 1)
            try:
                plain = mixprec.unwrap(model)
            except Exception as exc:
                raise self._violation(
                    "unwrap", f"mixprec.unwrap failed: {type(exc).__name__}: {exc}",
                    "Make unwrap_module() turn the converted layers back into plain ones (or "
                    "return the module as it is).", cause=exc) from exc
            bad = all_finite(dict(plain.named_parameters()))
            if isinstance(plain, mixprec.WrappedModule) or mixprec.is_wrapped(plain) or bad:
                raise self._violation(
                    "unwrap", "unwrap returned a module that is still wrapped or holds inf/NaN.",
                    "Return the inner module from unwrap_module(), with finite values.")

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

    def _check_refused(
        self, model: torch.nn.Module, opt: torch.optim.Optimizer,
        build: Callable[[], mixprec.PrecisionWrapper], error: type[BaseException], what: str,
        unknown_option: bool = False,
    ) -> None:
        """``build().wrap(model, opt)`` must raise ``error`` before anything changes."""
        snapshot = Snapshot.take(model, opt)
        converted: list[bool] = []
        try:
            precision = build()
            original = precision.precision_mode.convert_module

            def spy(module: torch.nn.Module) -> Any:
                converted.append(True)
                return original(module)

            precision.precision_mode.convert_module = spy  # type: ignore[method-assign]
            precision.wrap(model, opt)
        except Exception as exc:
            if not (isinstance(exc, error) and isinstance(exc, MixprecError)):
                raise self._violation(
                    "clear errors", f"{what} raised {type(exc).__name__}: {exc}",
                    f"Raise {error.__name__} (a mixprec.MixprecError) with one sentence on what "
                    "is wrong and what to do instead.", cause=exc) from exc
            message = str(exc)
            if unknown_option and _UNKNOWN_OPTION not in message:
                raise self._violation(
                    "clear errors", f"the error for an unknown option does not name it: {message}",
                    "Name the option and list the accepted ones (a factory with explicit "
                    "keyword-only parameters gets this from the registry).") from exc
            if converted:
                raise self._violation(
                    "clear errors", f"{what} was refused only inside convert_module() "
                    f"({message}).", "Check in the factory or validate(), which run before "
                    "anything is mutated.") from exc
        else:
            raise self._violation(
                "clear errors", f"{what} was accepted silently.",
                "Refuse unknown or invalid options with mixprec.exceptions.ModeOptionError (give "
                "the factory explicit keyword-only parameters instead of **kwargs), and what the "
                "mode cannot take with a MixprecError from validate().")
        diffs = snapshot.differences(model, opt)
        if diffs:
            raise self._violation(
                "clear errors", f"refusing {what} changed {_listing(diffs)}.",
                "Raise before mutating anything: check in the factory or validate().")
