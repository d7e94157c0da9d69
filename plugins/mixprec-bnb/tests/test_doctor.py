"""mixprec.doctor on a plugin mode: a QLoRA fine-tune of a tiny Llama on nf4-dq.

The doctor needs nothing from the plugin beyond its mode: it finds ``lm_head`` the most
sensitive layer (quantizing it alone costs the model output more SQNR than any other
layer), recommends keeping it in full precision through the mode's own
``ignore_modules`` option, and its measured fix recovers most of the loss gap to the
full-precision LoRA base. (The modes keep ``lm_head`` in full precision by default; the
doctor runs them with ``quantize_lm_head=True`` to measure it.)
"""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mixprec
from mixprec._bench.model import MarkovTask, lm_loss

VOCAB, SEQ, BATCH = 128, 32, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LM_HEAD = "base_model.model.lm_head"
NF4 = "nf4-dq[quantize_lm_head=true]"  # lm_head quantized too, as the doctor measures it


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return lm_loss(model(input_ids=batch[:, :-1]).logits, batch[:, 1:])


def _tiny_llama_lora() -> tuple[peft.PeftModel, list[torch.Tensor]]:
    """A tiny Llama built from its config, pretrained 150 fp32 steps on a Markov source,
    with LoRA adapters on every Linear layer but the head (as a QLoRA recipe does)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    task = MarkovTask(VOCAB, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for batch in task.batches(150, BATCH, SEQ, 1):
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    torch.manual_seed(1)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16,
                                                      target_modules=TARGETS))
    return lora, list(task.batches(8, BATCH, SEQ, 2))


@pytest.mark.slow
# peft reads a transformers attribute that transformers 5 deprecates; not ours to fix
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_doctor_keeps_lm_head_of_an_nf4_llama_and_recovers_the_gap() -> None:
    model, batches = _tiny_llama_lora()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = mixprec.doctor(model, batches, loss_fn=_loss, modes=[NF4], steps=30)
    for key, value in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(value, before[key]), key

    plain = report.mode(NF4)
    assert "ignore_modules" in plain.takes  # read from the plugin's factory
    ranked = [lr.name for lr in plain.ranked()]
    assert ranked[0] == LM_HEAD  # the most sensitive layer
    head = plain.layer(LM_HEAD)
    assert head.impact_db < 30 and head.impact_db == pytest.approx(head.out_db, abs=0.5)
    assert head.impact_pct > 0  # quantizing it alone costs loss

    rec = report.recommendation
    assert LM_HEAD in rec.ignore_modules
    assert rec.candidate is not None and rec.candidate.mode == NF4
    assert f"ignore_modules=[{LM_HEAD!r}" in rec.wrap_line
    fixed = next(m for m in report.modes if m.candidate.fix_of == NF4)
    assert fixed.candidate == rec.candidate
    assert fixed.layer(LM_HEAD).impact_db == float("inf")  # kept in fp32
    # the loss gap to the full-precision LoRA base (32-true): mostly recovered
    assert plain.gap_pct > 0.1
    recovered = (plain.gap_pct - fixed.gap_pct) / plain.gap_pct
    assert recovered >= 0.8, (plain.gap_pct, fixed.gap_pct)
    # what it costs: lm_head's 64 x 128 weights in fp32 instead of 4 bits
    assert plain.bytes_per_param < fixed.bytes_per_param < report.mode("32-true").bytes_per_param


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_cli_lora_examines_the_frozen_weight_modes(tmp_path, capsys) -> None:
    """``mixprec doctor --lora``: the bench GPT pretrained in fp32 with LoRA adapters, on
    which the modes that freeze quantized weights are examined (without --lora they are
    listed as not examined, with the reason)."""
    from mixprec._cli import main

    out = tmp_path / "doctor.json"
    # named without --lora: examined against full fp32 training; the mode's warning that it
    # froze the Linear weights is a finding of the report, not a warning printed per copy
    assert main(["doctor", "--size", "tiny", "--steps", "3", "--quiet", "--modes", "nf4-dq",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "nf4-dq: mode-warning: Mode 'nf4-dq' froze 5 Linear weights" in text
    assert text.count("nf4-dq: mode-warning: Mode 'nf4-dq' froze 5") == 1
    assert main(["doctor", "--lora", "--size", "tiny", "--steps", "3", "--quiet",
                 "--modes", "nf4-dq", "--json", str(out)]) == 0
    import json

    data = json.loads(out.read_text())
    nf4 = next(m for m in data["modes"] if m["label"] == "nf4-dq")
    assert nf4["status"] == "ok" and nf4["final_loss"] is not None
    assert nf4["bytes_per_param"] < data["modes"][0]["bytes_per_param"]  # vs the LoRA base


def test_frozen_weight_modes_are_examined_by_default_only_with_adapters() -> None:
    from mixprec._bench.model import PRESETS, BenchGPT
    from mixprec._doctor.run import default_modes

    model = BenchGPT(PRESETS["tiny"])
    chosen, left_out = default_modes(model, torch.device("cpu"))
    assert "nf4-dq" not in chosen and any(
        m == "nf4-dq" and "--lora" in why for m, why in left_out)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["qkv"]))
    chosen, _ = default_modes(lora, torch.device("cpu"))
    assert {"nf4", "nf4-dq", "fp4", "int8"} <= set(chosen)
