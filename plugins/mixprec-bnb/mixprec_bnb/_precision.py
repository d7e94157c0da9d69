"""``BitsandbytesMode``: Linear layers quantized to 4 or 8 bits with bitsandbytes."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterable, Mapping
from typing import Any, cast

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
    unmatched_patterns,
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
    layer casts its input to ``dtype`` and returns the input's dtype; the model's
    outputs come back in fp32 (``keep_output_dtype=True`` keeps the forward's dtype),
    as in every other 16/8-bit mode.

    The model's output layer (``lm_head``) stays in full precision unless
    ``quantize_lm_head=True``, as transformers keeps it for bitsandbytes; so do the
    modules a transformers model lists in ``_keep_in_fp32_modules`` (T5's ``wo``).
    transformers' ``Conv1D`` layers (GPT-2 family) are quantized like Linear layers
    with the transposed weight, as transformers does. Layers transformers already
    quantized (a model loaded with ``BitsAndBytesConfig``) are kept as they are, not
    quantized again. On a transformers model, ``config.quantization_config``
    describes the quantized layers, so ``save_pretrained`` writes a checkpoint that
    ``from_pretrained`` loads quantized.

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
    :param quantize_lm_head: quantize the model's output layer too. Default False: it
        stays in full precision, as transformers keeps it when it quantizes with
        bitsandbytes (the logits are the most sensitive output of a language model). The
        output layer is what ``model.get_output_embeddings()`` returns where the model
        has that method (transformers, and peft models through it), else the modules
        named ``lm_head`` (``base_model.model.lm_head`` too).
    :param keep_output_dtype: return the model's floating-point outputs in the dtype the
        forward produced them (bf16/fp16 for a model built in 16 bits) instead of fp32.
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
        quantize_lm_head: bool = False,
        keep_output_dtype: bool = False,
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
        self.quantize_lm_head = check_bool(quantize_lm_head, "quantize_lm_head")
        self.keep_output_dtype = check_bool(keep_output_dtype, "keep_output_dtype")
        self._options = {
            "dtype": None if dtype is None else dtype_name(self.dtype),  # type: ignore[arg-type]
            "ignore_modules": list(self.ignore_modules) or None,
            "blocksize": blocksize,
            "quant_storage": None if quant_storage is None else dtype_name(self.quant_storage),
            "master_weights": True if master_weights else None,
            "quantize_lm_head": True if self.quantize_lm_head else None,
            "keep_output_dtype": True if self.keep_output_dtype else None,
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

        from ._hf import conv1d_class, inside, keep_in_fp32_names, output_layer_names
        from ._layers import QuantLinear4bit, QuantLinear8bit, TorchLinear

        plan = _Plan()
        adapters, plan.adapter_layers = _adapter_modules(module)
        plan.adapters = adapters
        conv1d = conv1d_class()
        heads = [] if self.quantize_lm_head else output_layer_names(module)
        fp32 = keep_in_fp32_names(module)
        names: dict[int, list[str]] = {}
        modules: dict[int, torch.nn.Module] = {}
        owners: dict[int, set[int]] = {}  # parameter id -> ids of the modules holding it
        for name, sub in module.named_modules(remove_duplicate=False):
            names.setdefault(id(sub), []).append(name)
            modules[id(sub)] = sub
            for p in sub._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), set()).add(id(sub))
        all_names = [n for ns in names.values() for n in ns if n]
        unmatched = unmatched_patterns(all_names, self.ignore_modules)
        if unmatched:
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
                plan.adopted.append((shown, sub, self._adoptable(sub, sub_names, config)))
            elif isinstance(sub, TorchLinear) or (conv1d is not None and type(sub) is conv1d):
                if "" in sub_names:
                    raise WrapError(
                        f"The model itself is a {type(sub).__name__}, which cannot be replaced in "
                        "place; wrap a container instead: mixprec.wrap(torch.nn.Sequential(model), …)."
                    )
                if any(match_module(n, self.ignore_modules) for n in sub_names):
                    plan.ignored.append(shown)
                elif any(inside(n, heads) for n in sub_names):
                    plan.output.append(shown)
                elif any(inside(n, fp32) for n in sub_names):
                    plan.fp32.append(shown)
                elif len(owners.get(id(sub.weight), ())) > 1:
                    plan.tied.append(shown)
                elif cast(torch.Tensor, sub.weight).numel() == 0:
                    plan.empty.append(shown)
                elif type(sub) is conv1d and config.trainable:
                    plan.conv1d_kept.append(shown)
                elif type(sub) is not TorchLinear and type(sub) is not conv1d:
                    plan.subclasses.append(f"{shown} ({type(sub).__name__})")
                else:
                    plan.targets.append((sub_names, sub))
        if plan.adopted:  # quantized when loaded: what the loader left alone stays so
            plan.as_loaded = [names[0] for names, _ in plan.targets]
            plan.targets = []
        if not plan.targets and not plan.existing and not plan.adopted:
            skipped = (len(plan.ignored) + len(plan.output) + len(plan.fp32) + len(plan.tied)
                       + len(plan.subclasses) + len(plan.empty) + len(plan.conv1d_kept))
            reason = (f"all {skipped} are excluded: ignore_modules, the output layer "
                      "(quantize_lm_head=True quantizes it), _keep_in_fp32_modules, tied "
                      "weights, subclasses, empty layers or (int8-training) Conv1D layers"
                      if skipped else "it has none")
            raise WrapError(
                f"Mode {self.name!r} found no torch.nn.Linear layer to quantize ({reason}); "
                "wrap the model in a mode that fits it, such as 'bf16-true'."
            )
        return plan

    def _adoptable(self, layer: torch.nn.Module, names: list[str], config: Any) -> Any:
        """The :class:`QuantConfig` of a bitsandbytes layer mixprec did not make (transformers
        built it, loading with ``BitsAndBytesConfig``), to keep it as it is; raises if this
        mode cannot take it over without quantizing twice."""
        from ._hf import describe_foreign, foreign_config

        shown = names[0] or type(layer).__name__
        what = describe_foreign(layer)
        state = getattr(layer.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise WrapError(
                f"Layer {shown!r} is a bitsandbytes {what} whose weight bitsandbytes repacked "
                "for its CPU inference kernel (a forward in eval mode); wrap the model before "
                "running it in eval mode."
            )
        found = foreign_config(layer, config.compute_dtype)
        if found is None:
            raise WrapError(
                f"Layer {shown!r} is a bitsandbytes {what} without quantized weights (on meta, "
                f"or trainable 16-bit weights); {self.name!r} cannot take it over. Load the "
                "model's weights first, or start from the full-precision model."
            )
        if found != config:
            opts = []
            if found.kind == "4bit" and found.blocksize != 64:
                opts.append(f"blocksize={found.blocksize}")
            if found.kind == "4bit" and found.quant_storage is not torch.uint8:
                opts.append(f"quant_storage={dtype_name(found.quant_storage)!r}")
            suggest = repr(found.mode_name) + (f" with {', '.join(opts)}" if opts else "")
            raise WrapError(
                f"Layer {shown!r} is already quantized: a bitsandbytes {what} (loaded so, e.g. "
                f"by transformers with BitsAndBytesConfig), and mode {self.name!r} would "
                f"quantize it twice; wrap with mode {suggest}, which keeps it as it is, with an "
                "optimizer-only mode such as '32-true+adamw8bit', or start from the "
                "full-precision model."
            )
        if any(match_module(n, self.ignore_modules) for n in names):
            raise WrapError(
                f"Layer {shown!r} is already quantized (a bitsandbytes {what}) but matches "
                "ignore_modules; quantization cannot be undone exactly: load the model with "
                "BitsAndBytesConfig(llm_int8_skip_modules=[...]) instead."
            )
        return found

    # -- conversion -------------------------------------------------------------------------

    def convert_module(self, module: torch.nn.Module) -> list[str]:
        from ._hf import attach_quantization_config, conv1d_class, scales
        from ._layers import QuantLinear4bit, QuantLinear8bit, build_layer, is_quantized_layer

        device = device_of(module)
        config = self.config(device)
        self.compute_dtype = config.compute_dtype
        plan = self._plan(module, config)
        frozen: list[str] = []
        trainable: list[str] = []  # int8-training: the weights that stay trainable
        per_weight = const = weights = conv1d = 0
        for names, linear in plan.targets:
            layer = build_layer(linear, config)  # one layer at a time: quantize, then swap
            for name in names:
                parent_name, _, attr = name.rpartition(".")
                module.get_submodule(parent_name)._modules[attr] = layer
            if linear.weight.requires_grad and not config.trainable:
                frozen.append(names[0] + ".weight")
            elif config.trainable and layer.weight.requires_grad:
                trainable.append(names[0] + ".weight")
            conv1d += layer.conv1d
            p, c = layer.storage_nbytes()
            per_weight, const = per_weight + p, const + c
            weights += cast(torch.Tensor, linear.weight).numel()
        for _, layer, found in plan.adopted:  # in place: hooks, names and the weight stay
            source = getattr(layer, "source_cls", None)  # set by transformers' loading
            if found.kind == "4bit":
                layer.__class__ = QuantLinear4bit
                layer.quant_state = layer.weight.quant_state
            else:  # the scales where this plugin's layers keep them: on the weight
                layer.weight.SCB, layer.weight.CB = scales(layer), layer.weight.data
                layer.__class__ = QuantLinear8bit
            layer._configure(found)
            if source is not None and source is conv1d_class():
                layer.conv1d = True
            p, c = layer.storage_nbytes()
            per_weight, const = per_weight + p, const + c
            weights += layer.in_features * layer.out_features
        for _, layer in plan.existing:
            if not config.trainable:
                layer._configure(dataclasses.replace(layer.config, compute_dtype=config.compute_dtype))
            p, c = layer.storage_nbytes()
            per_weight, const = per_weight + p, const + c
            weights += layer.in_features * layer.out_features
        lines = [self._describe_quantization(config, plan, weights, per_weight, const)]
        if conv1d:
            lines.append(f"{conv1d} of them transformers Conv1D layers, quantized with the "
                         "transposed weight (as transformers does)")
        if plan.existing:
            lines.append(f"kept {len(plan.existing)} layers mixprec quantized before (in "
                         "init_module, or by a wrap that unwrap undid)")
        if plan.adopted:
            lines.append(f"kept {len(plan.adopted)} layers already quantized "
                         f"({config.mode_name}, e.g. loaded by transformers with "
                         "BitsAndBytesConfig) as they are, not quantized again: "
                         f"{_shorten([shown for shown, _, _ in plan.adopted])}")
        if plan.as_loaded:
            lines.append("left in full precision as loaded (the model came with quantized "
                         f"layers; mixprec quantizes no others): {_shorten(plan.as_loaded)}")
        if plan.ignored:
            lines.append(f"left in full precision (ignore_modules): {_shorten(plan.ignored)}")
        if plan.output:
            lines.append("left in full precision (the output layer, as transformers keeps it "
                         f"for bitsandbytes; quantize_lm_head=True quantizes it): "
                         f"{_shorten(plan.output)}")
        if plan.fp32:
            lines.append("left in full precision (the model's _keep_in_fp32_modules, which "
                         f"transformers never quantizes): {_shorten(plan.fp32)}")
        if plan.tied:
            lines.append("left in full precision (weight tied to another module, e.g. the "
                         f"embedding): {_shorten(plan.tied)}")
        if plan.empty:
            lines.append(f"left alone (no weights to quantize): {_shorten(plan.empty)}")
        if plan.subclasses:
            lines.append("left alone (torch.nn.Linear subclasses that may not call their own "
                         f"forward): {_shorten(plan.subclasses)}")
        if plan.conv1d_kept:
            lines.append("left alone (transformers Conv1D layers: int8-training keeps their "
                         "weights trainable in their own (in, out) layout; 'int8' quantizes "
                         f"them): {_shorten(plan.conv1d_kept)}")
        if plan.adapter_layers:
            lines.append(f"left alone: the adapters of {plan.adapter_layers} peft layers "
                         "(trainable)")
        if config.trainable:
            named = f" ({_shorten(trainable)})" if trainable else ""
            lines.append(f"weights stay trainable in {dtype_name(config.compute_dtype)}{named}; "
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
        quantized = {id(m) for m in module.modules() if is_quantized_layer(m)}
        lines += attach_quantization_config(module, config, quantized, plan.adapters)
        return lines

    def _describe_quantization(self, config: Any, plan: _Plan, weights: int, per_weight: int,
                               const: int) -> str:
        layers = len(plan.targets) + len(plan.existing) + len(plan.adopted)
        what = (f"{config.mode_name}, blocksize {config.blocksize}, storage "
                f"{dtype_name(config.quant_storage)}" if config.kind == "4bit"
                else config.mode_name)
        ratio = per_weight / weights if weights else 0.0
        books = f" + {const:,} bytes of code books" if const else ""
        return (f"quantized {layers} Linear layers ({what}; compute "
                f"{dtype_name(config.compute_dtype)}): {weights:,} weights in {per_weight:,} "
                f"bytes ({ratio:.4f} B/weight){books}")

    def convert_output(self, data: Any) -> Any:
        """bf16/fp16 outputs in fp32 (``keep_output_dtype=True``: as the forward made them),
        as the core's 16-bit modes return them; fp32 and fp64 outputs stay as they are."""
        if self.keep_output_dtype:
            return data
        return mixprec.apply_to_float_tensors(
            data, lambda t: t.float() if t.dtype in (torch.bfloat16, torch.float16) else t)

    def init_context(self, device: torch.device | str | None = None
                     ) -> contextlib.AbstractContextManager[None]:
        """Build Linear layers already quantized (on ``meta``: when a state dict is loaded)."""
        from ._init import quantized_init

        target = torch.device(device) if device is not None else torch.get_default_device()
        probe = torch.device("cpu") if target.type == "meta" else target
        return quantized_init(self.config(probe), self.ignore_modules, device,
                              quantize_lm_head=self.quantize_lm_head)

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
    #: (names, layer): ``torch.nn.Linear`` or transformers ``Conv1D`` layers to quantize
    targets: list[tuple[list[str], torch.nn.Module]] = dataclasses.field(default_factory=list)
    existing: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    subclasses: list[str] = dataclasses.field(default_factory=list)
    tied: list[str] = dataclasses.field(default_factory=list)
    empty: list[str] = dataclasses.field(default_factory=list)
    output: list[str] = dataclasses.field(default_factory=list)  # the lm_head, kept
    fp32: list[str] = dataclasses.field(default_factory=list)  # _keep_in_fp32_modules
    conv1d_kept: list[str] = dataclasses.field(default_factory=list)  # int8-training
    #: bitsandbytes layers mixprec did not make, kept: (name, layer, their QuantConfig)
    adopted: list[tuple[str, Any, Any]] = dataclasses.field(default_factory=list)
    as_loaded: list[str] = dataclasses.field(default_factory=list)
    adapters: set[int] = dataclasses.field(default_factory=set)
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
