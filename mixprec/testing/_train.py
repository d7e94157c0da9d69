"""Conformance checks of training, checkpoints, outputs, building and copies
(PYTEST_DONT_REWRITE: the kit raises its own messages)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

import mixprec
from mixprec.exceptions import CheckpointError

from ._base import ConformanceBase, _InjectedFailure, _listing, _raw
from ._helpers import all_finite, clone_nested, float_tensors, nested_differences

__all__ = ["TrainChecks"]


class TrainChecks(ConformanceBase):
    """Checks of a wrapped pair at work: overflow, resume, outputs, init, copies."""

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
            ignored = tuple(self.resume_ignore_keys)
            got_model = {k: v for k, v in model.state_dict().items() if not k.endswith(ignored)}
            expected_model = {k: v for k, v in expected_model.items() if not k.endswith(ignored)}
            diffs = nested_differences(expected_model, got_model, "model",
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

    def _expected_init_dtype(self, precision: mixprec.PrecisionWrapper, name: str) -> torch.dtype:
        default = precision.precision_mode.param_dtype or torch.float32
        spec = self.init_dtype
        if isinstance(spec, Mapping):
            return spec.get(name, default)
        return default if spec is None else spec

    def test_init_module_builds_in_the_modes_dtype(self) -> None:
        """Under ``mixprec.init_module(mode)`` models are built in the mode's dtype;
        the default dtype is restored after the block, also on errors."""
        with self._session():
            default = torch.get_default_dtype()
            mode = self._mode_arg()
            options = self.options if isinstance(mode, str) else {}
            with mixprec.init_module(mode, device=self.device, **options) as precision:
                model = self.make_model()
            self._check_default_dtype(default, "after the init_module block")
            wrong = [f"{n} is {p.dtype}, expected {self._expected_init_dtype(precision, n)}"
                     for n, p in model.named_parameters()
                     if p.is_floating_point() and p.dtype != self._expected_init_dtype(precision, n)]
            if wrong:
                raise self._violation(
                    "init_module", f"parameters built under init_module: {_listing(wrong, 4)}.",
                    "Set the default dtype in init_context() (and restore it after), so the model "
                    "never exists in fp32; or set init_dtype on the test class (a dtype, or a dict "
                    "of parameter names to dtypes).")
            model = model.to(self.device)
            wrapped, opt = precision.wrap(model, self.make_optimizer(model))
            self._train(wrapped, opt, 1)
            self._check_finite(wrapped, opt, "after building under init_module and one step")
            failing = mixprec.init_module(self._mode_arg(), device=self.device, **options)
            with contextlib.suppress(_InjectedFailure), failing:
                raise _InjectedFailure("inside the block")
            self._check_default_dtype(default, "after an error inside the init_module block")

    def _check_default_dtype(self, default: torch.dtype, when: str) -> None:
        if torch.get_default_dtype() != default:
            now = torch.get_default_dtype()
            torch.set_default_dtype(default)
            raise self._violation(
                "init_module", f"the default dtype is {now} {when}, was {default}.",
                "Restore the default dtype in a finally: block of init_context().")

    def test_init_module_on_meta_then_load(self) -> None:
        """``init_module(mode, device="meta")`` builds without memory; loading the fp32
        weights (:attr:`meta_init`: ``"assign"`` before wrap, or ``"to_empty"`` then
        wrap then load) gives the fp32 model's outputs."""
        if self.meta_init is None:
            pytest.skip("meta_init = None on this test class")
        if self.meta_init not in ("assign", "to_empty"):
            raise TypeError(f"{type(self).__name__}.meta_init must be 'assign', 'to_empty' or None.")
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
            if self.meta_init == "assign":
                how = "load_state_dict(fp32 state, assign=True), then wrap"
            else:
                how = "to_empty(), wrap, then load_state_dict(fp32 state)"
            try:
                if self.meta_init == "assign":
                    model.load_state_dict(reference.state_dict(), assign=True)
                    wrapped, _ = precision.wrap(model, self.make_optimizer(model))
                else:
                    model = model.to_empty(device=self.device)
                    wrapped, _ = precision.wrap(model, self.make_optimizer(model))
                    wrapped.load_state_dict(reference.state_dict())
            except Exception as exc:
                raise self._violation(
                    "init_module", f"a model built on meta fails at {how}: "
                    f"{type(exc).__name__}: {exc}",
                    "Support one of the two flows: convert_module() takes loaded tensors as they "
                    "are (meta_init = 'assign'), or load_module_state_dict() loads plain fp32 "
                    "weights into the converted layers (meta_init = 'to_empty'); set meta_init = "
                    "None on the test class only if neither can work.", cause=exc) from exc
            self._check_close_to(reference, wrapped, "init_module", f"after building on meta and "
                                 f"{how},", "Convert or load every parameter and buffer, including "
                                 "derived state (scales, quantized copies).")

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

    def test_audit_monitor_and_doctor_examine_the_mode(self) -> None:
        """``opt.precision.audit()`` and a ``mixprec.Monitor`` see the mode's steps, and
        ``mixprec.doctor`` examines it (a string mode that trains), through the mode
        interface alone."""
        with self._session():
            torch.manual_seed(0)
            model = self._model()
            monitor = mixprec.Monitor(every=1, warn=False)
            try:
                model, opt = self._precision(monitor=monitor).wrap(
                    model, self.make_optimizer(model))
                self._train(model, opt, 2)
                audit = opt.precision.audit(show=False)
            except Exception as exc:
                raise self._violation(
                    "examined", f"training with a mixprec.Monitor, or opt.precision.audit(), "
                    f"raised {type(exc).__name__}: {exc}",
                    "Keep the model a torch module tree the wrapper's hooks can observe, and "
                    "step only through the optimizer the wrapper steps.", cause=exc) from exc
            steps = [r["step"] for r in monitor.history]
            problems = []
            if steps != [0, 1]:
                problems.append(f"the monitor recorded steps {steps}, not [0, 1]")
            if audit.steps != 2 or audit.mode != opt.precision.mode_name:
                problems.append(f"the audit reports mode {audit.mode!r} after {audit.steps} "
                                f"step(s), not {opt.precision.mode_name!r} after 2")
            missing = [f.message for f in audit.flags if f.cause == "not-in-optimizer"]
            if missing:
                problems.append(f"the audit found {missing[0]}")
            if problems:
                raise self._violation(
                    "examined", _listing(problems) + ".",
                    "Remap the optimizer to the parameters convert_module() creates (keep them "
                    "at the old dotted names) and let the wrapper run every step.")
            if not (isinstance(self.mode, str) and self.trainable):
                return  # the doctor takes mode strings, and trains what is trainable
            from mixprec._doctor.result import Candidate

            batches = [self.make_batch(i) for i in range(2)]
            candidate = Candidate(self.mode, tuple(sorted(self.options.items())))
            report = mixprec.doctor(self._model(), batches, loss_fn=self.compute_loss,
                                    modes=[candidate], steps=2, measure_batches=1,
                                    fixes=False, optimizer=_raw(type(self), "optimizer_factory"))
            result = report.mode(candidate.label)
            if result.status != "ok" or result.final_loss is None:
                raise self._violation(
                    "examined", f"mixprec.doctor could not examine the mode: {result.error}",
                    "Let the mode wrap a deep copy of a model (the doctor examines copies) and "
                    "keep its forward context reentrant.")

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
