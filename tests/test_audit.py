"""opt.precision.audit(): the real dtypes and places, and every flag provoked once."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import TinyNet, make_batch

import mixprec
import mixprec.distributed as mpd
import mixprec.utils


def _steps(model, opt, n: int = 2, *, fp32_loss: bool = True):
    for i in range(n):
        tokens, targets = make_batch(seed=i)
        out = model(tokens)
        logits = out.float() if fp32_loss else out
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
    return out, loss


def _wrap(mode: str = "32-true", **options):
    torch.manual_seed(0)
    model = TinyNet()
    return mixprec.wrap(model, torch.optim.AdamW(model.parameters()), mode, **options)


def _entry(audit, section: str, what: str):
    return [e for e in audit.entries(section) if e.what == what]


def test_bf16_masters_are_reported_where_they_are(capsys):
    model, opt = _wrap("bf16-true", master_weights=True)
    assert opt.precision.audit(show=False).causes == {"no-step-yet"}  # and now it records
    _steps(model, opt)
    audit = opt.precision.audit()
    printed = capsys.readouterr().out
    assert printed.startswith("mixprec audit: mode bf16-true, 2 step(s)")
    (weights,) = _entry(audit, "model weights", "trainable parameters")
    assert (weights.dtype, weights.device, weights.count) == ("bfloat16", "cpu", 7)
    (masters,) = _entry(audit, "master weights", "fp32 masters")
    assert (masters.dtype, masters.count, masters.numel) == ("float32", 7, weights.numel)
    (group,) = audit.entries("optimizer parameter groups")
    assert group.dtype == "float32" and "masters" in group.note
    state = {e.what: e.dtype for e in audit.entries("optimizer state")}
    assert state == {"state 'step'": "float32", "state 'exp_avg'": "float32",
                     "state 'exp_avg_sq'": "float32"}
    forward = {e.what: e.dtype for e in audit.entries("forward")}
    assert forward == {"model output": "float32", "loss given to opt.backward": "float32"}
    assert audit.causes == set() and "flags: none" in printed
    assert audit.loss_scale is None


def test_a_loss_in_bf16_is_flagged():
    model, opt = _wrap("bf16-true", keep_output_dtype=True)
    opt.precision.audit(show=False)  # from here on the forward and the loss are recorded
    out, loss = _steps(model, opt, fp32_loss=False)
    assert loss.dtype is torch.bfloat16
    audit = opt.precision.audit(show=False)
    assert "loss-low-precision" in audit.causes
    assert {e.what: e.dtype for e in audit.entries("forward")} == {
        "model output": "bfloat16", "loss given to opt.backward": "bfloat16"}
    # given directly, with nothing recorded
    _, fresh_opt = _wrap("32-true")
    given = fresh_opt.precision.audit(output=out, loss=loss, show=False)
    assert "loss-low-precision" in given.causes
    assert {e.what: e.dtype for e in given.entries("forward")}["model output"] == "bfloat16"


def test_optimizer_state_below_the_weights_precision_is_flagged():
    model, opt = _wrap("32-true")
    _steps(model, opt)
    assert opt.precision.audit(show=False).causes == set()
    p = model.fc1.weight
    opt.state[p]["exp_avg_sq"] = opt.state[p]["exp_avg_sq"].to(torch.bfloat16)
    audit = opt.precision.audit(show=False)
    flag = next(f for f in audit.flags if f.cause == "state-below-weights")
    assert "fc1.weight['exp_avg_sq'] bfloat16 < float32" in flag.message
    dtypes = {(e.what, e.dtype): e.count for e in audit.entries("optimizer state")}
    assert dtypes[("state 'exp_avg_sq'", "bfloat16")] == 1


def test_trainable_parameters_outside_the_optimizer_are_flagged():
    torch.manual_seed(0)
    net = TinyNet()
    model, opt = mixprec.wrap(net, torch.optim.AdamW(net.fc1.parameters()), "bf16-mixed")
    _steps(model, opt)
    flag = next(f for f in opt.precision.audit(show=False).flags
                if f.cause == "not-in-optimizer")
    assert flag.message.startswith("5 trainable parameter(s)")  # embed (= head), norm x2, fc2 x2
    assert "fc2.weight" in flag.message and "fc1" not in flag.message



@pytest.mark.parametrize("asked", ["generator", "critic", "model"])
def test_several_optimizers_are_audited_together(asked):
    """With several optimizers every ``opt_i.precision.audit()`` (and the model's) shows
    each optimizer, flags only parameters no optimizer holds, and sees a loss given to
    any optimizer's backward."""
    torch.manual_seed(0)
    net = TinyNet()
    opt_g = torch.optim.AdamW([*net.embed.parameters(), *net.fc1.parameters()])
    opt_d = torch.optim.AdamW([*net.norm.parameters(), net.fc2.weight])  # fc2.bias in none
    model, (opt_g, opt_d) = mixprec.wrap(net, [opt_g, opt_d], "bf16-true",
                                         master_weights=True)
    wrapper = {"generator": opt_g.precision, "critic": opt_d.precision,
               "model": model.precision}[asked]
    wrapper.audit(show=False)  # the recorder is installed from here on
    for i, opt in enumerate((opt_g, opt_d)):
        tokens, targets = make_batch(seed=i)
        logits = model(tokens).flatten(0, 1)
        if opt is opt_d:
            logits = logits.bfloat16()  # a loss in bf16, given to opt_d.backward
        loss = torch.nn.functional.cross_entropy(logits, targets.flatten())
        opt.backward(loss)
        opt_g.step()
        opt_d.step()
        opt_g.zero_grad()
        opt_d.zero_grad()
    result = wrapper.audit(show=False)
    # each optimizer's groups and state, the masters of both
    groups = [_entry(result, f"optimizer {i} parameter groups", "group 0") for i in (0, 1)]
    assert [g[0].numel for g in groups] == [32 * 16 + 16 * 32 + 32, 2 * 32 + 16 * 32]
    assert [e.numel for e in result.entries("optimizer 1 state")
            if e.what == "state 'exp_avg'"] == [2 * 32 + 16 * 32]
    assert sum(e.numel for e in result.entries("master weights")) == sum(
        p.numel() for p in net.parameters()) - 16  # fc2.bias: no optimizer, no master
    # only fc2.bias is in no optimizer
    flags = [f for f in result.flags if f.cause == "not-in-optimizer"]
    assert len(flags) == 1 and flags[0].message.startswith(
        "1 trainable parameter(s) are not in any optimizer"), flags
    assert "fc2.bias" in flags[0].message and "fc1" not in flags[0].message
    # the last loss went through opt_d.backward, in bf16: seen whichever was asked
    assert "loss-low-precision" in result.causes


class KeepSome(mixprec.PrecisionMode):
    """A plugin-style mode that swaps Linear layers for a subclass, except ignore_modules."""

    def __init__(self, ignore_modules=()) -> None:
        self.ignore_modules = tuple(ignore_modules)
        self.name = "test-keep-some"

    def options(self):
        return {"ignore_modules": list(self.ignore_modules)}

    def convert_module(self, module):
        for name, sub in module.named_modules():
            if type(sub) is torch.nn.Linear and not mixprec.utils.match_module(
                    name, self.ignore_modules):
                sub.__class__ = _SwappedLinear
        return ["swapped Linear layers"]


class _SwappedLinear(torch.nn.Linear):
    pass


def test_layers_a_mode_left_unconverted_are_flagged_with_the_reason():
    torch.manual_seed(0)
    net = TinyNet()
    model, opt = mixprec.wrap(net, torch.optim.AdamW(net.parameters()),
                              KeepSome(ignore_modules=["fc2"]))
    _steps(model, opt)
    flag = next(f for f in opt.precision.audit(show=False).flags if f.cause == "unconverted")
    assert "fc2 (a plain torch.nn.Linear): kept by ignore_modules pattern 'fc2'" in flag.message
    assert "fc1" not in flag.message
    # a true mode: a layer added after wrap stays in fp32
    model, opt = _wrap("bf16-true")
    model.module.extra = torch.nn.Linear(4, 4)
    flag = next(f for f in opt.precision.audit(show=False).flags if f.cause == "unconverted")
    assert "extra (float32, not bfloat16): the mode did not convert it" in flag.message


def test_a_model_moved_after_wrap_is_flagged():
    model, opt = _wrap("bf16-mixed")
    _steps(model, opt, 1)
    assert "moved-device" not in opt.precision.audit(show=False).causes
    model.to("meta")  # stands for any other device: autocast still runs for 'cpu'
    flag = next(f for f in opt.precision.audit(show=False).flags if f.cause == "moved-device")
    assert "on meta" in flag.message and "'cpu'" in flag.message


@contextlib.contextmanager
def _one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ddp_and_fsdp2_reduce_and_gather_dtypes(tmp_path):
    with _one_rank_group(tmp_path):
        torch.manual_seed(0)
        net = TinyNet()
        model, opt = mixprec.wrap(net, torch.optim.AdamW(net.parameters()), "bf16-true")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        _steps(ddp, opt, 1)
        (entry,) = opt.precision.audit(show=False).entries("distributed")
        assert (entry.what, entry.dtype) == ("DDP all-reduce", "bfloat16")
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Embedding(32, 16), torch.nn.Linear(16, 16),
                                  torch.nn.GELU(), torch.nn.Linear(16, 32))
        mpd.fully_shard(net, "bf16-mixed", modules=[net[1]])
        model, opt = mixprec.wrap(net, torch.optim.AdamW(net.parameters()), "bf16-mixed")
        _steps(model, opt, 1)
        entries = opt.precision.audit(show=False).entries("distributed")
        assert {(e.what, e.dtype) for e in entries} == {("FSDP2 all-gather", "bfloat16"),
                                                        ("FSDP2 reduce-scatter", "float32")}


def test_a_copy_of_an_audited_model_still_pickles_and_trains(tmp_path):
    model, opt = _wrap("16-mixed")
    _steps(model, opt)
    opt.precision.audit(show=False)
    torch.save(model, tmp_path / "model.pt")
    copy = torch.load(tmp_path / "model.pt", weights_only=False)
    tokens, _ = make_batch()
    assert torch.equal(copy(tokens), model(tokens))
    _steps(model, opt, 1)  # the recorded backward still scales and steps
    assert opt.precision.steps == 3
