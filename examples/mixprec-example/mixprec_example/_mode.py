"""The ``bf16-sr`` mode: bf16 weights trained without fp32 masters.

Plain bf16 training (``bf16-true``) rounds every update to the nearest bf16
value. bf16 keeps 8 significant bits, so an update smaller than half the spacing
around a weight (about ``|w| / 256``) is lost entirely: late in training, when
updates are small, the weights stop moving. fp32 master weights fix that at
4 more bytes per parameter. Stochastic rounding fixes it for free: rounding up
or down at random, with probabilities proportional to the distance, makes every
rounded update right on average, so many small updates add up as they would in
fp32.

What this mode does:

- parameters and floating-point buffers are cast to bf16; the forward runs in
  bf16 (inputs cast, outputs returned in fp32 unless ``keep_output_dtype``);
- around each optimizer step, fp32 copies of the parameters and gradients
  stand in the optimizer (so its math and state are fp32), and the updated
  values are stochastically rounded back into the bf16 parameters with the
  mode's own ``torch.Generator`` (seeded by ``seed``; its state is saved in checkpoints, so
  a resumed run is bit-identical).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

import mixprec
from mixprec.exceptions import CheckpointError, ModeOptionError, UnsupportedDeviceError
from mixprec.utils import cast_floating

from ._rounding import stochastic_round_to_bf16

__all__ = ["Bf16StochasticRounding"]


class Bf16StochasticRounding(mixprec.PrecisionMode):
    """bf16 weights, fp32 optimizer math, stochastically rounded updates.

    :param seed: seed of the rounding's random generator (one per device).
    :param keep_output_dtype: return outputs in bf16 instead of fp32.
    """

    name = "bf16-sr"

    def __init__(self, *, seed: int = 0, keep_output_dtype: bool = False) -> None:
        # Options are checked here, before wrap() touches the model (contract: clear errors).
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ModeOptionError(
                f"bf16-sr: seed must be an integer in [0, 2**63), got {seed!r}; pass e.g. seed=0."
            )
        if not isinstance(keep_output_dtype, bool):
            raise ModeOptionError(
                f"bf16-sr: keep_output_dtype must be True or False, got {keep_output_dtype!r}."
            )
        self.seed = seed
        self.keep_output_dtype = keep_output_dtype
        self._generators: dict[str, torch.Generator] = {}

    # -- description -------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"seed": self.seed}
        if self.keep_output_dtype:
            opts["keep_output_dtype"] = True
        return opts

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.bfloat16

    # -- wrap ----------------------------------------------------------------------------

    def validate(self, module: torch.nn.Module, device: torch.device) -> None:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UnsupportedDeviceError(
                "This GPU does not support bfloat16; use '16-true' with master_weights=True "
                "instead of 'bf16-sr'.",
                device=device,
            )

    def convert_module(self, module: torch.nn.Module) -> list[str]:
        # New tensors in the same Parameter objects: wrap can roll the cast back.
        n_params, n_buffers = cast_floating(module, torch.bfloat16)
        return [
            f"cast {n_params} parameters and {n_buffers} buffers to torch.bfloat16",
            f"optimizer math and state in fp32; updates stochastically rounded to bf16 "
            f"(seed {self.seed})",
        ]

    def init_context(
        self, device: torch.device | str | None = None
    ) -> contextlib.AbstractContextManager[None]:
        return mixprec.build_context(torch.bfloat16, device)

    # -- forward -------------------------------------------------------------------------

    def forward_context(self) -> contextlib.AbstractContextManager[None]:
        return mixprec.build_context(torch.bfloat16)

    def convert_input(self, data: Any) -> Any:
        return mixprec.apply_to_float_tensors(data, lambda t: t.to(torch.bfloat16))

    def convert_output(self, data: Any) -> Any:
        if self.keep_output_dtype:
            return data
        return mixprec.apply_to_float_tensors(data, lambda t: t.float())

    # -- step ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def optimizer_step_context(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Give the optimizer fp32 copies of the bf16 parameters; round back stochastically.

        The copies (with the parameters' gradients and optimizer state) stand in
        the optimizer's parameter lists for the block, so its math and state are
        fp32; afterwards each updated copy is rounded into its parameter in place
        and the state returns to the parameter. The parameter objects never change
        dtype (``p.data = p.data.float()`` would drop the gradient accumulator and
        the hooks on it, which DDP relies on).

        The wrapper also enters this context around ``optimizer.load_state_dict``,
        so loaded state is cast to fp32. Parameters without a gradient are not
        updated by torch optimizers: they are left as they are, without drawing
        random numbers (a checkpoint load must not advance the generator).
        """
        def round_back(param: torch.Tensor, updated: torch.Tensor) -> None:
            if param.grad is not None:
                param.copy_(stochastic_round_to_bf16(updated, self._generator(param.device)))

        with mixprec.step_in_dtype(optimizer, torch.bfloat16, torch.float32, round_back):
            yield

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[key] = gen
        return gen

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # Generator states are uint8 tensors: checkpoints load with weights_only=True.
        return {"generators": {key: gen.get_state() for key, gen in self._generators.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        generators = state.get("generators", {})
        if not isinstance(generators, Mapping) or not all(
                isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in generators.values()):
            raise CheckpointError(
                "bf16-sr: the checkpoint's 'generators' entry is not a dict of generator states; "
                "pass the state saved by opt.state_dict() or opt.precision.state_dict()."
            )
        for key, value in generators.items():
            self._generator(torch.device(key)).set_state(value.cpu())
