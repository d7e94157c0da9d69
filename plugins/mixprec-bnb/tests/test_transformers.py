"""The Hugging Face round trip: transformers models (built from their configs, nothing is
downloaded) under the bitsandbytes modes.

- the output layer (``lm_head``) stays in full precision unless ``quantize_lm_head=True``;
- GPT-2's ``Conv1D`` layers are quantized as transformers quantizes them;
- ``save_pretrained`` of a wrapped model writes a checkpoint ``from_pretrained`` loads
  quantized, and a model transformers loaded with ``BitsAndBytesConfig`` can be wrapped;
- QLoRA: the quantized base and peft's adapters load in plain transformers + peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from conftest import TinyLM, make_lm, wrap_quiet
from mixprec_bnb import BitsandbytesMode, QuantLinear4bit, QuantLinear8bit
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

import mixprec
from mixprec.exceptions import ModeOptionError, WrapError

VOCAB = 128
LLAMA_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)
# peft reads a transformers attribute that transformers 5 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()  # eval: no dropout, outputs compare exactly


def tokens(seed: int = 1, size: tuple[int, int] = (2, 16)) -> torch.Tensor:
    return torch.randint(0, VOCAB, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def lm_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    """Next-token loss on a fixed task: token t is followed by (3 t + 1) mod VOCAB."""
    g = torch.Generator().manual_seed(step % 4)
    start = torch.randint(0, VOCAB, (8, 1), generator=g)
    ids = [start]
    for _ in range(15):
        ids.append((3 * ids[-1] + 1) % VOCAB)
    batch = torch.cat(ids, dim=1)
    out = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(out.reshape(-1, VOCAB).float(), batch[:, 1:].reshape(-1))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    model.train()
    losses = []
    for step in range(steps):
        loss = lm_loss(model, step)
        if hasattr(opt, "backward"):
            opt.backward(loss)
        else:
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def lora(model: torch.nn.Module, targets: list[str], seed: int = 11,
         **options: object) -> peft.PeftModel:
    torch.manual_seed(seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                      **options))


def quantized_names(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bitLt))}


# -- lm_head -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["nf4-dq", "fp4", "int8"])
def test_lm_head_stays_in_full_precision_by_default(mode: str) -> None:
    wrapped = wrap_quiet(tiny_llama(), None, mode)
    assert type(wrapped.lm_head) is torch.nn.Linear
    assert len(quantized_names(wrapped)) == LLAMA_LINEARS
    assert ("left in full precision (the output layer, as transformers keeps it for "
            "bitsandbytes; quantize_lm_head=True quantizes it): lm_head") in wrapped.precision.summary


def test_quantize_lm_head_quantizes_it() -> None:
    wrapped = wrap_quiet(tiny_llama(), None, BitsandbytesMode("nf4-dq", quantize_lm_head=True))
    assert isinstance(wrapped.lm_head, QuantLinear4bit)
    assert "output layer" not in wrapped.precision.summary
    assert wrapped.precision.precision_mode.options() == {"quantize_lm_head": True}
    # the mode string takes it as a typed boolean
    other = wrap_quiet(tiny_llama(), None, "int8[quantize_lm_head=true]")
    assert isinstance(other.lm_head, QuantLinear8bit)
    with pytest.raises(ModeOptionError, match="quantize_lm_head takes True or False"):
        BitsandbytesMode("nf4", quantize_lm_head="no")  # type: ignore[arg-type]


def test_a_plain_module_named_lm_head_and_a_get_output_embeddings_layer_are_kept() -> None:
    # no get_output_embeddings: the module named lm_head (conftest's TinyLM)
    wrapped = wrap_quiet(make_lm(), None, "nf4")
    assert type(wrapped.lm_head) is torch.nn.Linear

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(64, 64)
            self.out = torch.nn.Linear(64, 64)
            self.lm_head = torch.nn.Linear(64, 64)  # not the output layer here

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.out

    wrapped = wrap_quiet(Model(), None, "nf4")
    assert type(wrapped.out) is torch.nn.Linear
    assert quantized_names(wrapped) == {"body", "lm_head"}


def test_a_model_whose_only_linear_is_the_head_says_how_to_quantize_it() -> None:
    with pytest.raises(WrapError, match=r"all 1 are excluded: ignore_modules, the output layer "
                                        r"\(quantize_lm_head=True quantizes it\)"):
        mixprec.wrap(torch.nn.ModuleDict({"lm_head": torch.nn.Linear(64, 64)}), None, "nf4")


def test_init_module_keeps_lm_head_too() -> None:
    config = tiny_llama().config
    with mixprec.init_module("nf4-dq", device="meta"):  # on meta: transformers' init writes
        model = LlamaForCausalLM(config)                # into the weights it builds
    assert type(model.lm_head) is torch.nn.Linear
    assert len(quantized_names(model)) == LLAMA_LINEARS
    with mixprec.init_module(BitsandbytesMode("nf4-dq", quantize_lm_head=True), device="meta"):
        other = LlamaForCausalLM(config)
    assert isinstance(other.lm_head, QuantLinear4bit)
    with mixprec.init_module("nf4") as precision:
        lm = TinyLM()
    wrapped = precision.wrap(lm)
    assert type(wrapped.lm_head) is torch.nn.Linear
    assert "quantize_lm_head=True quantizes it): lm_head" in wrapped.precision.summary


# -- peft names ----------------------------------------------------------------------------


def test_ignore_modules_lm_head_selects_the_peft_name() -> None:
    """peft names the head ``base_model.model.lm_head``: ``"lm_head"`` selects it (matched
    from the end), and the default finds it through peft's get_output_embeddings."""
    model = lora(tiny_llama(), ["q_proj", "v_proj"])
    mode = BitsandbytesMode("nf4-dq", ignore_modules={"lm_head"}, quantize_lm_head=True)
    wrapped = wrap_quiet(model, None, mode)
    assert type(wrapped.base_model.model.lm_head) is torch.nn.Linear
    assert "left in full precision (ignore_modules): base_model.model.lm_head" in \
        wrapped.precision.summary
    default = wrap_quiet(lora(tiny_llama(), ["q_proj", "v_proj"]), None, "nf4-dq")
    assert type(default.base_model.model.lm_head) is torch.nn.Linear
    assert "quantizes it): base_model.model.lm_head" in default.precision.summary


# -- Conv1D (GPT-2) ------------------------------------------------------------------------


def test_gpt2_conv1d_layers_are_quantized_as_transformers_does(tmp_path: Path) -> None:
    """Every Conv1D becomes a 4-bit layer holding its transposed weight: bit-identical to
    transformers quantizing the same checkpoint with BitsAndBytesConfig, and close to the
    full-precision model."""
    model = tiny_gpt2()
    model.save_pretrained(tmp_path)
    ids = tokens()
    reference = logits(model, ids)
    wrapped = wrap_quiet(model, None, "nf4")
    layers = [m for m in wrapped.modules() if isinstance(m, QuantLinear4bit)]
    assert len(layers) == 8 and all(m.conv1d for m in layers)
    assert not any(isinstance(m, Conv1D) for m in wrapped.modules())
    assert type(wrapped.lm_head) is torch.nn.Linear  # the output layer (tied, too)
    assert "8 of them transformers Conv1D layers" in wrapped.precision.summary
    out = logits(wrapped, ids)
    # nf4 rounding: within 6% of the logits' spread here (it is 2-4% per layer)
    assert (out - reference).abs().max() <= 0.06 * 2 * reference.abs().max()
    assert (out - reference).std() <= 0.1 * reference.std()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    assert torch.equal(logits(theirs, ids), out)
    for name, layer in wrapped.named_modules():
        if isinstance(layer, QuantLinear4bit):
            assert torch.equal(layer.weight.data, theirs.get_submodule(name).weight.data)


def test_gpt2_conv1d_dense_checkpoint_loads_in_its_own_layout() -> None:
    """A full-precision GPT-2 state dict (Conv1D weights ``(in, out)``, square ones too)
    loads into the quantized model exactly as quantizing it at wrap."""
    state = tiny_gpt2(seed=3).state_dict()
    direct = wrap_quiet(tiny_gpt2(seed=3), None, "int8")
    loaded = wrap_quiet(tiny_gpt2(seed=0), None, "int8")
    loaded.load_state_dict(state, strict=False)
    ids = tokens()
    assert torch.equal(logits(loaded, ids), logits(direct, ids))


def test_gpt2_lora_on_nf4_learns_like_on_the_fp32_model() -> None:
    """LoRA (wrap first, then peft's bitsandbytes-aware layers) on the nf4 GPT-2 lowers the
    loss within 10% as much as LoRA on the same model in fp32 (0.494 vs 0.498 here)."""
    def finetune(mode: str | None) -> float:
        model = tiny_gpt2()
        if mode is None:  # peft's Conv1D LoRA layers take the (in, out) layout
            peft_model = lora(model, ["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
        else:
            model = wrap_quiet(model, None, mode).module
            peft_model = lora(model, ["c_attn", "c_proj", "c_fc"])
            assert type(model.transformer.h[0].attn.c_attn) is peft.tuners.lora.bnb.Linear4bit
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        losses = train(peft_model, opt, 30)
        return losses[0] - sum(losses[-5:]) / 5

    drop32, drop4 = finetune(None), finetune("nf4")
    assert drop32 > 0.3
    assert abs(drop4 - drop32) <= 0.10 * drop32, (drop4, drop32)


def test_int8_training_leaves_conv1d_alone_and_says_so() -> None:
    with pytest.raises(WrapError, match=r"\(int8-training\) Conv1D layers"):
        mixprec.wrap(tiny_gpt2(), None, "int8-training")


def test_old_error_on_gpt2_is_gone() -> None:
    wrapped = wrap_quiet(tiny_gpt2(), None, "int8")
    assert len(quantized_names(wrapped)) == 8


# -- save_pretrained / from_pretrained -----------------------------------------------------


@pytest.mark.parametrize(("mode", "options", "expected"), [
    ("nf4-dq", {}, {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                    "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16",
                    "llm_int8_skip_modules": ["lm_head"]}),
    ("fp4", {"blocksize": 128, "quantize_lm_head": True, "dtype": "32"},
     {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
      "bnb_4bit_compute_dtype": "float32", "llm_int8_skip_modules": []}),
    # transformers' int8 layers compute in the input's dtype (fp32 here): dtype="32" matches
    ("int8", {"ignore_modules": ["layers.1.mlp"], "dtype": "32"},
     {"load_in_8bit": True, "llm_int8_threshold": 0.0, "llm_int8_skip_modules": [
         "lm_head", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj",
         "model.layers.1.mlp.up_proj"]}),
])
def test_save_pretrained_loads_back_in_plain_transformers(tmp_path: Path, mode, options,
                                                          expected) -> None:
    model = tiny_llama()
    config = model.config
    wrapped = wrap_quiet(model, None, BitsandbytesMode(mode, **options))
    assert not hasattr(config, "quantization_config")  # the caller's config object: unchanged
    wrapped.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert {k: written[k] for k in expected} == expected
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert quantized_names(loaded) == quantized_names(wrapped)
    ids = tokens()
    if mode == "int8":
        # On the CPU in eval mode bitsandbytes' Linear8bitLt also quantizes the activations;
        # mixprec's int8 layers use its weight-only path, which Linear8bitLt takes in
        # training mode: the same outputs there, within 2% of the largest logit in eval.
        expected = logits(wrapped, ids)
        torch.testing.assert_close(logits(loaded, ids), expected, rtol=0,
                                   atol=0.02 * float(expected.abs().max()))
        loaded.train()  # no dropout in Llama: only the int8 path changes
    assert torch.equal(logits(loaded, ids), logits(wrapped, ids))


def test_int8_training_saves_plain_weights(tmp_path: Path) -> None:
    wrapped = wrap_quiet(tiny_llama(), None, "int8-training")
    wrapped.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not quantized_names(loaded)
    for name, p in wrapped.named_parameters():
        assert torch.equal(loaded.get_parameter(name).float(), p.float()), name


def test_a_model_loaded_with_bitsandbytes_config_is_wrapped_as_it_is(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16))
    ids = tokens()
    before = logits(loaded, ids)
    layers = {n: (m, m.weight, m.weight.data.clone()) for n, m in loaded.named_modules()
              if isinstance(m, Linear4bit)}
    assert len(layers) == LLAMA_LINEARS
    wrapped = wrap_quiet(loaded, None, "nf4-dq")
    for name, (layer, weight, data) in layers.items():  # the same layers, not re-quantized
        assert wrapped.module.get_submodule(name) is layer
        assert isinstance(layer, QuantLinear4bit)
        assert layer.weight is weight and torch.equal(layer.weight.data, data)
    assert f"kept {LLAMA_LINEARS} layers already quantized (nf4-dq, e.g. loaded by transformers " \
        "with BitsAndBytesConfig) as they are, not quantized again" in wrapped.precision.summary
    assert torch.equal(logits(wrapped, ids), before)


def test_qlora_on_a_model_loaded_with_bitsandbytes_config(tmp_path: Path) -> None:
    """transformers' QLoRA recipe: load in 4 bits, add adapters, then wrap with the 8-bit
    optimizer; the loaded layers are kept inside peft's LoRA layers."""
    tiny_llama().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16))
    peft_model = lora(loaded, ["q_proj", "v_proj"])
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model, opt = mixprec.wrap(peft_model, opt, "nf4-dq+adamw8bit")
    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer,
                      QuantLinear4bit)
    assert f"kept {LLAMA_LINEARS} layers already quantized" in opt.precision.summary
    losses = train(peft_model, opt, 15)
    assert losses[-1] < losses[0]


def test_a_model_loaded_in_another_format_names_the_mode_to_use(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4"))
    for mode in ("nf4-dq", "int8"):
        with pytest.raises(WrapError, match=r"Layer 'model.layers.0.self_attn.q_proj' is already "
                                            r"quantized: a bitsandbytes Linear4bit \(fp4, "
                                            r"blocksize 64\).* wrap with mode 'fp4'"):
            mixprec.wrap(loaded, None, mode)
    assert type(loaded.model.layers[0].self_attn.q_proj) is Linear4bit  # nothing changed
    with pytest.raises(WrapError, match="matches ignore_modules"):
        mixprec.wrap(loaded, None, BitsandbytesMode("fp4", ignore_modules={"q_proj"}))
    # an optimizer-only mode leaves the layers as they are
    opt = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad])
    mixprec.wrap(loaded, opt, "adamw8bit")
    assert type(loaded.model.layers[0].self_attn.q_proj) is Linear4bit


@pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")  # transformers' own int8 layers
def test_a_model_loaded_in_8bit_is_wrapped_by_int8(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=["lm_head", "down_proj"]))
    ids = tokens()
    before = logits(loaded, ids)
    wrapped = wrap_quiet(loaded, None, "int8")
    assert {n for n, m in wrapped.named_modules() if isinstance(m, QuantLinear8bit)} == \
        {n for n, m in loaded.named_modules() if isinstance(m, Linear8bitLt)}
    assert type(wrapped.model.layers[0].mlp.down_proj) is torch.nn.Linear  # as loaded
    assert ("left in full precision as loaded (the model came with quantized layers; mixprec "
            "quantizes no others): model.layers.0.mlp.down_proj") in wrapped.precision.summary
    torch.testing.assert_close(logits(wrapped, ids), before, atol=2e-2, rtol=2e-2)
    wrapped.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert type(again.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert quantized_names(again) == quantized_names(wrapped)


def test_qlora_fine_tuned_with_mixprec_loads_in_plain_transformers_and_peft(
        tmp_path: Path) -> None:
    """Wrap, save the quantized base, train LoRA adapters, save them with peft: plain
    transformers + peft load both and give the same outputs."""
    wrapped = wrap_quiet(tiny_llama(), None, "nf4-dq")
    wrapped.save_pretrained(tmp_path / "base")  # the base does not change while adapters train
    peft_model = lora(mixprec.unwrap(wrapped), ["q_proj", "k_proj", "v_proj", "o_proj"])
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model, opt = mixprec.wrap(peft_model, opt, "nf4-dq+adamw8bit")
    losses = train(peft_model, opt, 15)
    assert losses[-1] < losses[0]
    peft_model.save_pretrained(tmp_path / "adapters")

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    plain = peft.PeftModel.from_pretrained(base, tmp_path / "adapters").eval()
    ids = tokens()
    assert torch.equal(logits(plain, ids), logits(peft_model, ids))


def test_wrap_then_get_peft_model_then_wrap_with_an_8bit_optimizer() -> None:
    """The documented order for an 8-bit optimizer when adapters come after quantizing:
    wrap, unwrap (the quantized layers stay), get_peft_model, wrap again with the same
    precision mode and the optimizer mode. A wrapped model inside the peft model could
    not be wrapped again (AlreadyWrappedError)."""
    from bitsandbytes.optim import AdamW8bit

    model = mixprec.unwrap(wrap_quiet(tiny_llama(), None, "nf4-dq"))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert type(model.model.layers[0].self_attn.q_proj) is peft.tuners.lora.bnb.Linear4bit
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model, opt = mixprec.wrap(peft_model, opt, mode="nf4-dq+adamw8bit")
    assert isinstance(opt.optimizer, AdamW8bit)
    assert f"kept {LLAMA_LINEARS} layers mixprec quantized before" in opt.precision.summary
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for n, p in peft_model.named_parameters() if "lora_" in n}
    losses = train(peft_model, opt, 15)
    assert losses[-1] < losses[0]


def test_a_failed_wrap_puts_the_old_config_back() -> None:
    """The quantization_config lives on a copy of the config that the modules hold; if wrap
    fails after converting the model, the modules hold the old config object again."""

    class Failing(mixprec.OptimizerMode):
        name = "failing"

        def convert_optimizer(self, optimizer, module, param_names):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    model = tiny_llama()
    config = model.config
    holders = [m for m in model.modules() if m.__dict__.get("config") is config]
    assert len(holders) > 2  # the model, its LlamaModel, its attention layers, …
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(RuntimeError, match="boom"):
        wrap_quiet(model, opt, [BitsandbytesMode("nf4"), Failing()])
    assert all(m.__dict__["config"] is config for m in holders)
    assert not hasattr(config, "quantization_config") and not quantized_names(model)


def test_two_patterns_that_select_the_same_module_both_count_as_matched() -> None:
    """``"lm_head"`` and ``"base_model.model.lm_head"`` both select peft's head: neither is
    reported as matching nothing (only the first one that selected a module counted)."""
    mode = BitsandbytesMode("nf4-dq", ignore_modules=["lm_head", "base_model.model.lm_head"],
                            quantize_lm_head=True)
    wrapped = wrap_quiet(lora(tiny_llama(), ["q_proj"]), None, mode)
    assert type(wrapped.base_model.model.lm_head) is torch.nn.Linear
    with mixprec.init_module(BitsandbytesMode("nf4", ignore_modules=["blocks", "blocks.0"])):
        TinyLM()  # filterwarnings=error: no "matched no module" warning


def test_keep_in_fp32_modules_stay_in_full_precision_and_round_trip(tmp_path: Path) -> None:
    """T5 asks for its ``wo`` layers in fp32 (``_keep_in_fp32_modules``), which transformers
    never quantizes: mixprec keeps them too, so the saved checkpoint loads."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        decoder_start_token_id=0)).eval()
    wrapped = wrap_quiet(model, None, "nf4")
    kept = sorted(n for n, m in wrapped.named_modules() if type(m) is torch.nn.Linear)
    assert kept == sorted([f"{part}.block.{i}.layer.{j}.DenseReluDense.wo"
                           for part, j in (("encoder", 1), ("decoder", 2)) for i in range(2)]
                          + ["lm_head"])
    assert "the model's _keep_in_fp32_modules" in wrapped.precision.summary
    wrapped.save_pretrained(tmp_path)
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path)
    ids = tokens()
    with torch.no_grad():
        ours = wrapped(input_ids=ids, decoder_input_ids=ids).logits
        theirs = loaded(input_ids=ids, decoder_input_ids=ids).logits
    assert quantized_names(loaded) == quantized_names(wrapped)
    assert torch.equal(theirs, ours)
