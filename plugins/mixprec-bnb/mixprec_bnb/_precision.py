"""``BitsandbytesMode``: Linear layers quantized to 4 or 8 bits with bitsandbytes."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch

import mixprec
from mixprec.exceptions import (
    CheckpointError,
    ModeOptionError,
    UnsupportedDeviceError,
    WrapError,
)
from mixprec.utils import (
    check_bool,
    check_number,
    closest_name,
    device_of,
    dtype_name,
    match_module,
    normalize_patterns,
    parse_dtype,
    short_dtype_name,
    warn_user,
)

from ._deps import require_bitsandbytes

__all__ = ["BitsandbytesMode"]

#: mode name -> (kind, quant type, double quantization, trainable weights)
MODES: dict[str, tuple[str, str, bool, bool]] = {
    "nf4": ("4bit", "nf4", False, False),
    "nf4-dq": ("4bit", "nf4", True, False),
    "fp4": ("4bit", "fp4", False, False),
    "fp4-dq": ("4bit", "fp4", True, False),
    "int8": ("int8", "int8", False, False),
    "int8-training": ("int8", "int8", False, True),
}
#: The compute dtypes (``dtype``): what bitsandbytes' kernels take.
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _quant_storage(value: Any) -> torch.dtype:
    """The ``quant_storage`` option: ``"uint8"`` (bitsandbytes' packing) or a float dtype
    as :func:`mixprec.utils.parse_dtype` reads it (the packed bytes viewed as that dtype,
    for FSDP-style flattening with the other parameters)."""
    if isinstance(value, (str, torch.dtype)) and value in ("uint8", torch.uint8):
        return torch.uint8
    try:
        return parse_dtype(value, COMPUTE_DTYPES, option="quant_storage")
    except ModeOptionError:
        names = ", ".join(f"'{short_dtype_name(d)}'" for d in (torch.uint8, *COMPUTE_DTYPES))
        raise ModeOptionError(f"Unsupported quant_storage {value!r}; use one of {names}.") from None


class BitsandbytesMode(mixprec.PrecisionMode):
    """Quantize the model's ``torch.nn.Linear`` layers with bitsandbytes.

    ``nf4``/``fp4`` (and their double-quantized ``-dq`` forms) store 4-bit
    weights, ``int8`` stores int8 weights with per-row scales: these weights are
    frozen (train adapters such as LoRA on top). ``int8-training`` keeps
    trainable 16-bit weights and multiplies in int8. Everything that is not a
    quantized Linear weight (biases, norms, embeddings, excluded layers) is left
    as it is: its dtype, device and trainability do not change. A quantized
    layer casts its input to ``dtype`` and returns the input's dtype.

    :param mode: ``"nf4"``, ``"nf4-dq"``, ``"fp4"``, ``"fp4-dq"``, ``"int8"`` or
        ``"int8-training"``.
    :param dtype: compute dtype of the quantized layers (``"bf16"``, ``"16"``,
        ``"32"`` or a torch dtype, read by :func:`mixprec.utils.parse_dtype`); for
        ``int8-training`` also the dtype its
        weights are stored and trained in. Default: bf16 where the device
        supports it (CPU, recent GPUs), else fp16; fp16 for the int8 modes on
        CUDA, whose kernels take fp16 inputs.
    :param ignore_modules: dotted module names or globs to leave alone
        (``{"lm_head"}``, ``"blocks.*.attn"``), matched by
        :func:`mixprec.utils.match_module` as in every mode: a name or glob selects
        the module and everything inside it. A pattern that matches nothing is an error.
    :param blocksize: 4-bit only: values per quantization block (32 … 4096, default 64).
    :param quant_storage: 4-bit only: dtype the packed data is stored as
        (``"uint8"`` default; ``"bf16"``, ``"16"``, ``"32"`` for FSDP-style flattening).
    :param master_weights: ``int8-training`` only: keep fp32 master copies of the
        16-bit weights in the optimizer (gradients accumulate and the step runs in fp32).
        Default: on when the weights end up in fp16 (a torch Adam step on fp16 weights
        goes NaN: ``eps=1e-8`` is 0 in fp16), off otherwise.
    """

    def __init__(
        self,
        mode: str = "nf4-dq",
        *,
        dtype: str | torch.dtype | None = None,
        ignore_modules: str | Iterable[str] = (),
        blocksize: int | None = None,
        quant_storage: str | torch.dtype | None = None,
        master_weights: bool | None = None,
    ) -> None:
        if mode not in MODES:
            raise ModeOptionError(
                f"Unknown bitsandbytes precision mode {mode!r}; use one of {', '.join(MODES)}."
            )
        require_bitsandbytes(mode)
        self.name = mode
        self.kind, self.quant_type, self.double_quant, self.trainable = MODES[mode]
        self.dtype = None if dtype is None else parse_dtype(dtype, COMPUTE_DTYPES)
        self.ignore_modules = normalize_patterns(ignore_modules, "ignore_modules")
        four_bit = self.kind == "4bit"
        if blocksize is not None:
            if not four_bit:
                raise ModeOptionError(
                    f"blocksize applies to the 4-bit modes only; {mode} quantizes each weight "
                    "row with one scale. Drop the option."
                )
            blocksize = check_number(blocksize, "blocksize", minimum=BLOCKSIZES[0],
                                     maximum=BLOCKSIZES[-1], integer=True)
            if blocksize not in BLOCKSIZES:
                raise ModeOptionError(
                    f"blocksize={blocksize!r} is not supported by bitsandbytes; use one of "
                    f"{', '.join(map(str, BLOCKSIZES))}."
                )
        if quant_storage is not None and not four_bit:
            raise ModeOptionError(
                f"quant_storage applies to the 4-bit modes only; {mode} stores int8. Drop the option."
            )
        self.blocksize = 64 if blocksize is None else int(blocksize)
        self.quant_storage = torch.uint8 if quant_storage is None else _quant_storage(quant_storage)
        if master_weights is not None:
            master_weights = check_bool(master_weights, "master_weights")
        if master_weights and not self.trainable:
            raise ModeOptionError(
                f"master_weights=True needs trainable weights; {mode} freezes the quantized "
                "weights. Use 'int8-training', or train adapters on top."
            )
        if master_weights and self.dtype is torch.float32:
            raise ModeOptionError(
                "master_weights=True needs 16-bit weights; with dtype=float32 they already "
                "are full precision."
            )
        self.master_weights = bool(master_weights)
        self._auto_masters = master_weights is None and self.trainable
        self._options = {
            "dtype": None if dtype is None else dtype_name(self.dtype),  # type: ignore[arg-type]
            "ignore_modules": list(self.ignore_modules) or None,
            "blocksize": blocksize,
            "quant_storage": None if quant_storage is None else dtype_name(self.quant_storage),
            "master_weights": True if master_weights else None,
        }
        self.compute_dtype: torch.dtype | None = self.dtype

    # -- description ----------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self._options.items() if v is not None}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"BitsandbytesMode({self.name!r}{', ' if opts else ''}{opts})"

    # -- configuration ----------------------------------------------------------------------

    def _resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is not None:
            if (self.dtype is torch.bfloat16 and device.type == "cuda"
                    and not torch.cuda.is_bf16_supported()):
                raise UnsupportedDeviceError(
                    f"This GPU does not support bfloat16; build the mode with dtype='16': "
                    f"BitsandbytesMode({self.name!r}, dtype='16').",
                    device=device,
                )
            return self.dtype
        if device.type == "cuda" and (self.kind == "int8" or not torch.cuda.is_bf16_supported()):
            return torch.float16  # bitsandbytes' int8 CUDA kernels take fp16 inputs
        return torch.bfloat16

    def config(self, device: torch.device | str = "cpu") -> Any:
        """The :class:`QuantConfig` this mode quantizes with on ``device``."""
        from ._layers import QuantConfig

        return QuantConfig(
            kind=self.kind, quant_type=self.quant_type, double_quant=self.double_quant,
            blocksize=self.blocksize, quant_storage=self.quant_storage,
            compute_dtype=self._resolve_dtype(torch.device(device)), trainable=self.trainable,
        )

    # -- validation -------------------------------------------------------------------------

    def validate(self, module: torch.nn.Module, device: torch.device) -> None:
        if device.type == "meta":
            raise WrapError(
                "The model's tensors are on the meta device; load its weights first with "
                "model.load_state_dict(state_dict, assign=True), then wrap it."
            )
        if device.type not in ("cpu", "cuda"):
            raise UnsupportedDeviceError(
                f"Mode {self.name!r} runs on the CPU or CUDA, not on {device.type!r}; move the "
                "model to one of them before wrapping.",
                device=device,
            )
        self._resolve_dtype(device)
        self._plan(module, self.config(device))

    def _plan(self, module: torch.nn.Module, config: Any) -> _Plan:
        """What ``convert_module`` will do; raises every predictable error."""
        from bitsandbytes.nn import Linear4bit, Linear8bitLt

        from ._layers import QuantLinear4bit, QuantLinear8bit, TorchLinear

        plan = _Plan()
        adapters, plan.adapter_layers = _adapter_modules(module)
        names: dict[int, list[str]] = {}
        modules: dict[int, torch.nn.Module] = {}
        owners: dict[int, set[int]] = {}  # parameter id -> ids of the modules holding it
        matched: set[str] = set()
        for name, sub in module.named_modules(remove_duplicate=False):
            names.setdefault(id(sub), []).append(name)
            modules[id(sub)] = sub
            for p in sub._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), set()).add(id(sub))
            if (pattern := match_module(name, self.ignore_modules)) is not None:
                matched.add(pattern)
        unmatched = [p for p in self.ignore_modules if p not in matched]
        if unmatched:
            all_names = [n for ns in names.values() for n in ns if n]
            hint = closest_name(unmatched[0], all_names)
            raise WrapError(
                f"ignore_modules pattern {unmatched[0]!r} matches no module of the model"
                + (f"; did you mean {hint!r}?" if hint else
                   f"; its modules are named like {', '.join(all_names[:3]) or '(none)'}.")
            )
        for key, sub in modules.items():
            sub_names = names[key]
            shown = sub_names[0] or type(sub).__name__
            if key in adapters:
                continue
            if isinstance(sub, (QuantLinear4bit, QuantLinear8bit)):
                built = sub.config if config.trainable else dataclasses.replace(
                    sub.config, compute_dtype=config.compute_dtype)
                if built != config:
                    raise WrapError(
                        f"Layer {shown!r} was quantized as {sub.config.mode_name} (blocksize "
                        f"{sub.config.blocksize}, {dtype_name(sub.config.compute_dtype)}) but "
                        f"this mode is {config.mode_name} (blocksize {config.blocksize}, "
                        f"{dtype_name(config.compute_dtype)}); wrap with the mode object it "
                        "was built with."
                    )
                if any(match_module(n, self.ignore_modules) for n in sub_names):
                    raise WrapError(
                        f"Layer {shown!r} is already quantized but matches ignore_modules; "
                        "quantization cannot be undone exactly: build the model with the same "
                        "ignore_modules (init_module applies them too)."
                    )
                if not sub.is_quantized:
                    raise WrapError(
                        f"Layer {shown!r} has no weights yet (built on meta); load a state dict "
                        "with model.load_state_dict(state_dict, assign=True) before wrapping."
                    )
                plan.existing.append((shown, sub))
            elif isinstance(sub, (Linear4bit, Linear8bitLt)):
                raise WrapError(
                    f"Layer {shown!r} is already a bitsandbytes {type(sub).__name__} not made by "
                    f"mixprec; {self.name!r} would quantize twice. Wrap with an optimizer-only "
                    "mode such as '32-true+adamw8bit', or start from the full-precision model."
                )
            elif isinstance(sub, TorchLinear):
                if "" in sub_names:
                    raise WrapError(
                        f"The model itself is a {type(sub).__name__}, which cannot be replaced in "
                        "place; wrap a container instead: mixprec.wrap(torch.nn.Sequential(model), …)."
                    )
                if any(match_module(n, self.ignore_modules) for n in sub_names):
                    plan.ignored.append(shown)
                elif len(owners.get(id(sub.weight), ())) > 1:
                    plan.tied.append(shown)
                elif sub.weight.numel() == 0:
                    plan.empty.append(shown)
                elif type(sub) is not TorchLinear:
                    plan.subclasses.append(f"{shown} ({type(sub).__name__})")
                else:
                    plan.targets.append((sub_names, sub))
        if not plan.targets and not plan.existing:
            skipped = len(plan.ignored) + len(plan.tied) + len(plan.subclasses) + len(plan.empty)
            reason = (f"all {skipped} are excluded: ignore_modules, tied weights, subclasses "
                      "or empty layers"
                      if skipped else "it has none")
            raise WrapError(
                f"Mode {self.name!r} found no torch.nn.Linear layer to quantize ({reason}); "
                "wrap the model in a mode that fits it, such as 'bf16-true'."
            )
        return plan

    # -- conversion -------------------------------------------------------------------------

    def convert_module(self, module: torch.nn.Module) -> list[str]:
        from ._layers import build_layer

        device = device_of(module)
        config = self.config(device)
        self.compute_dtype = config.compute_dtype
        plan = self._plan(module, config)
        frozen: list[str] = []
        per_weight = const = weights = 0
        for names, linear in plan.targets:
            layer = build_layer(linear, config)  # one layer at a time: quantize, then swap
            for name in names:
                parent_name, _, attr = name.rpartition(".")
                module.get_submodule(parent_name)._modules[attr] = layer
            if linear.weight.requires_grad and not config.trainable:
                frozen.append(names[0] + ".weight")
            p, c = layer.storage_nbytes()
            per_weight, const, weights = per_weight + p, const + c, weights + linear.weight.numel()
        for _, layer in plan.existing:
            if not config.trainable:
                layer._configure(dataclasses.replace(layer.config, compute_dtype=config.compute_dtype))
            p, c = layer.storage_nbytes()
            per_weight, const = per_weight + p, const + c
            weights += layer.in_features * layer.out_features
        lines = [self._describe_quantization(config, plan, weights, per_weight, const)]
        if plan.existing:
            lines.append(f"kept {len(plan.existing)} layers quantized in init_module")
        if plan.ignored:
            lines.append(f"left in full precision (ignore_modules): {_shorten(plan.ignored)}")
        if plan.tied:
            lines.append("left in full precision (weight tied to another module, e.g. the "
                         f"embedding): {_shorten(plan.tied)}")
        if plan.empty:
            lines.append(f"left alone (no weights to quantize): {_shorten(plan.empty)}")
        if plan.subclasses:
            lines.append("left alone (torch.nn.Linear subclasses that may not call their own "
                         f"forward): {_shorten(plan.subclasses)}")
        if plan.adapter_layers:
            lines.append(f"left alone: the adapters of {plan.adapter_layers} peft layers "
                         "(trainable)")
        if config.trainable:
            lines.append(f"weights stay trainable in {dtype_name(config.compute_dtype)}; "
                         "the int8 matmul re-quantizes them every forward")
            if self._auto_masters and config.compute_dtype is torch.float16:
                # Adam on fp16 weights divides by eps=1e-8, which is 0 in fp16: NaN on step 2.
                self.master_weights = True
                lines.append("fp32 master weights for the fp16 weights (pass "
                             "master_weights=False to train them in fp16)")
        else:
            lines.append("biases, norms, embeddings and excluded layers keep their dtype and "
                         "trainability")
        if frozen:
            lines.append(f"frozen by quantization: {len(frozen)} weights that required grad "
                         f"({_shorten(frozen)})")
            warn_user(
                f"Mode {self.name!r} froze {len(frozen)} Linear weights that required grad "
                f"({_shorten(frozen)}): quantized weights cannot train. Train LoRA adapters on "
                "top (peft), or exclude the layers to train with ignore_modules."
            )
        _mark_loaded(module, "is_loaded_in_4bit" if self.kind == "4bit" else
                     None if self.trainable else "is_loaded_in_8bit")
        return lines

    def _describe_quantization(self, config: Any, plan: _Plan, weights: int, per_weight: int,
                               const: int) -> str:
        layers = len(plan.targets) + len(plan.existing)
        what = (f"{config.mode_name}, blocksize {config.blocksize}, storage "
                f"{dtype_name(config.quant_storage)}" if config.kind == "4bit"
                else config.mode_name)
        ratio = per_weight / weights if weights else 0.0
        books = f" + {const:,} bytes of code books" if const else ""
        return (f"quantized {layers} Linear layers ({what}; compute "
                f"{dtype_name(config.compute_dtype)}): {weights:,} weights in {per_weight:,} "
                f"bytes ({ratio:.4f} B/weight){books}")

    def init_context(self, device: torch.device | str | None = None
                     ) -> contextlib.AbstractContextManager[None]:
        """Build Linear layers already quantized (on ``meta``: when a state dict is loaded)."""
        from ._init import quantized_init

        target = torch.device(device) if device is not None else torch.get_default_device()
        probe = torch.device("cpu") if target.type == "meta" else target
        return quantized_init(self.config(probe), self.ignore_modules, device)

    # -- checkpoints -------------------------------------------------------------------------

    def load_module_state_dict(
        self, module: torch.nn.Module, state: Mapping[str, Any], strict: bool
    ) -> Any:
        """Check the whole checkpoint first (nothing changes on error), then load it: the
        quantized layers take quantized entries as they are and quantize full-precision ones."""
        from ._layers import is_quantized_layer

        optional: set[str] = set()
        for name, layer in module.named_modules(remove_duplicate=False):
            if is_quantized_layer(layer):
                prefix = f"{name}." if name else ""
                layer.check_checkpoint(state, prefix)
                optional |= {k for k in layer.state_dict(prefix=prefix)
                             if k.startswith(prefix + "weight.")
                             or k in (prefix + "SCB", prefix + "weight_format")}
        if strict:
            expected = set(module.state_dict())
            missing = sorted(expected - optional - set(state))
            unexpected = sorted(set(state) - expected
                                - {k for k in state if k in optional})
            if missing or unexpected:
                parts = []
                if missing:
                    parts.append(f"missing {_shorten(missing)}")
                if unexpected:
                    parts.append(f"unexpected {_shorten(unexpected)}")
                raise CheckpointError(
                    f"The checkpoint does not fit the model ({'; '.join(parts)}); load it with "
                    "strict=False to take the entries that fit."
                )
        return module.load_state_dict(state, strict=strict)


@dataclasses.dataclass
class _Plan:
    targets: list[tuple[list[str], torch.nn.Linear]] = dataclasses.field(default_factory=list)
    existing: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    subclasses: list[str] = dataclasses.field(default_factory=list)
    tied: list[str] = dataclasses.field(default_factory=list)
    empty: list[str] = dataclasses.field(default_factory=list)
    adapter_layers: int = 0


def _adapter_modules(module: torch.nn.Module) -> tuple[set[int], int]:
    """ids of peft adapter modules (all of a tuner layer but its base layer), and how
    many tuner layers hold them."""
    found: set[int] = set()
    if "peft" not in sys.modules:  # no peft layer can exist without peft imported
        return found, 0
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = 0
    for sub in module.modules():
        if isinstance(sub, BaseTunerLayer):
            layers += 1
            for child_name, child in sub.named_children():
                if child_name != "base_layer":
                    found.update(id(m) for m in child.modules())
    return found, layers


def _mark_loaded(module: torch.nn.Module, flag: str | None) -> None:
    """Set the flag peft and transformers read to pick their quantized-layer code
    (``get_peft_model`` on a wrapped model adds bitsandbytes-aware LoRA layers)."""
    if flag is None or isinstance(getattr(type(module), flag, None), property):
        return
    module.__dict__[flag] = True


def _shorten(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f", … ({len(items)} in all)" if len(items) > limit else "")
