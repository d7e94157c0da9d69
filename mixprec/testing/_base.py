"""The conformance kit's base class: configuration, what the checks build, and
the plumbing they share (see :mod:`mixprec.testing`; PYTEST_DONT_REWRITE)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import pytest
import torch

import mixprec
from mixprec.exceptions import MixprecError

from ._contracts import ContractViolation
from ._helpers import (
    ConformanceNet,
    Snapshot,
    all_finite,
    default_batch,
    float_tensors,
)
from ._tools import train_steps

__all__ = ["ConformanceBase"]

_UNKNOWN_OPTION = "mixprec_conformance_no_such_option"


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


class ConformanceBase:
    """Configuration and shared plumbing of :class:`mixprec.testing.ModeConformance`."""

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
    #: State-dict keys (suffixes, e.g. ``"._extra_state"`` holding a pickled blob)
    #: left out of the resume comparison; the training they affect is still compared.
    resume_ignore_keys: ClassVar[tuple[str, ...]] = ()
    #: dtype of the model's floating-point outputs; None leaves it unchecked.
    output_dtype: ClassVar[torch.dtype | None] = torch.float32
    #: Largest ``‖out - ref‖ / ‖ref‖`` against the unwrapped fp32 model.
    max_output_error: ClassVar[float] = 0.1
    #: dtype of floating-point parameters built under ``mixprec.init_module``: a
    #: dtype, or a dict of parameter names to dtypes (others: the default). None /
    #: the default: the mode's ``param_dtype``, else float32.
    init_dtype: ClassVar[torch.dtype | Mapping[str, torch.dtype] | None] = None
    #: How a model built under ``init_module(mode, device="meta")`` gets its fp32
    #: weights: ``"assign"`` (``load_state_dict(state, assign=True)``, then wrap) or
    #: ``"to_empty"`` (``to_empty()``, wrap, then ``load_state_dict``); None skips.
    meta_init: ClassVar[str | None] = "assign"
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
        return train_steps(opt, lambda i: self.compute_loss(model, self.make_batch(i)), steps,
                           start=start, accumulate=self.accumulate)

    def _eval_loss(self, model: Any) -> float:
        with torch.no_grad():
            return sum(float(self.compute_loss(model, self.make_batch(i))) for i in range(4)) / 4

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

    def _check_finite(self, model: Any, opt: Any, when: str) -> None:
        bad = (all_finite({"model": model.state_dict()})
               + all_finite({"optimizer": opt.state_dict()["state"]})
               + all_finite({"buffers": dict(model.named_buffers())}))
        if bad:
            raise self._violation(
                "no poisoned weights", f"inf/NaN {when} in {_listing(bad)}.",
                "State updated during forward/backward (amax histories, running statistics) "
                "must ignore non-finite values or be updated only in a step that was not skipped.")

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
