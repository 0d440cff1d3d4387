"""Chapter 8's train_step against a plain PyTorch loop written here, and a run that learns.

The loop below is the textbook recipe, spelled out: for each optimizer step, the forward pass of
each of its micro-batches, loss / accumulation steps, backward; clip_grad_norm_; the optimizer
step; the learning-rate schedule (transformers' own, not ours). It is fed the very micro-batches
that train_step fed its model (recorded with a forward pre-hook), so the data order is not under
test here; the arithmetic of a step is.

Entry points used (so that a refactor of chapter 8 knows what this file relies on):
qlora_mini.config.TrainConfig (keyword fields), qlora_mini.train.setup_run(cfg) -> run,
qlora_mini.train.train_step(run) -> log record {"loss", "lr", "grad_norm"}, run.model.
"""
import copy
import json

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from qlora_mini.config import TrainConfig
from qlora_mini.train import setup_run, train_step
from tiny_model import make_tiny_model

STEPS, ACCUMULATION, MAX_GRAD_NORM, LR = 6, 3, 0.5, 1e-2
WARMUP_RATIO, WARMUP_STEPS = 0.34, 3       # transformers' Trainer: ceil(0.34 * 6 steps) = 3
# The same float32 operations in the same order on both sides: what remains is summation order
# inside fused kernels, far below these. A missing clip, accumulation or schedule moves the
# parameters by 1e-4 and more (test_the_comparison_can_fail).
ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def config(tiny, out, **changes) -> TrainConfig:
    """A plain-LoRA run of the tiny model in float32, without dropout (the reference loop draws no
    masks) or checkpointing, with torch's AdamW so that the reference can use the same class."""
    fields = dict(model=str(tiny), output=str(out), quantize=False, lora_r=4, lora_dropout=0.0,
                  gradient_checkpointing=False, optim="adamw_torch", learning_rate=LR,
                  weight_decay=0.01, lr_scheduler_type="cosine", warmup_ratio=WARMUP_RATIO,
                  max_steps=STEPS, gradient_accumulation_steps=ACCUMULATION,
                  per_device_train_batch_size=2, max_grad_norm=MAX_GRAD_NORM, target_max_len=32,
                  max_eval_samples=2, eval_steps=0, save_steps=1000)
    return TrainConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """(the model before training, the micro-batches train_step fed it, its log records, the
    model after STEPS steps)."""
    run = setup_run(config(tiny, tmp_path_factory.mktemp("run")))
    before = copy.deepcopy(run.model)
    batches = []
    record_batch = lambda module, args, kwargs: batches.append(
        {k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)})
    hook = run.model.register_forward_pre_hook(record_batch, with_kwargs=True)
    records = [train_step(run) for _ in range(STEPS)]
    hook.remove()
    return before, batches, records, run.model


def trainable(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def reference_loop(model, batches, clip=True, accumulate=True, schedule=True) -> list[dict]:
    """Train `model` in place on `batches` the plain way; the switches break one part each."""
    params = list(trainable(model).values())
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                            foreach=False)
    sched = get_cosine_schedule_with_warmup(opt, WARMUP_STEPS if schedule else 0,
                                            STEPS if schedule else 10**9)
    group = ACCUMULATION if accumulate else 1
    records = []
    for step in range(len(batches) // group):
        losses = []
        for batch in batches[step * group:(step + 1) * group]:
            loss = model(**batch).loss
            (loss / group).backward()
            losses.append(loss.item())
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM if clip else float("inf"))
        records.append({"loss": sum(losses) / group, "lr": opt.param_groups[0]["lr"],
                        "grad_norm": norm.item()})
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return records


def test_train_step_matches_a_plain_loop(trained):
    before, batches, records, after = trained
    assert len(batches) == STEPS * ACCUMULATION
    model = copy.deepcopy(before)
    expected = reference_loop(model, batches)
    assert trainable(model).keys() == trainable(after).keys() and trainable(model)
    for name, p in trainable(model).items():
        torch.testing.assert_close(trainable(after)[name], p, atol=ATOL, rtol=RTOL, msg=name)
    for got, want in zip(records, expected):
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    # what the comparison covers actually happened: a warm-up from 0, a decay, clipped steps
    lrs = [r["lr"] for r in records]
    assert lrs[0] == 0 and max(lrs) == pytest.approx(LR) and lrs[-1] < LR / 2
    assert any(r["grad_norm"] > MAX_GRAD_NORM for r in records)


@pytest.mark.parametrize("broken", ["clip", "accumulate", "schedule"])
def test_the_comparison_can_fail(trained, broken):
    """The reference loop without one of its parts lands elsewhere: the match above says that
    train_step has each part."""
    before, batches, _, after = trained
    model = copy.deepcopy(before)
    reference_loop(model, batches, **{broken: False})
    gaps = [(trainable(after)[n] - p).abs().max().item() for n, p in trainable(model).items()]
    assert max(gaps) > 100 * (ATOL + RTOL)


def test_training_learns_a_memorisable_set(tmp_path):
    """Four question-answer pairs, seen again and again: the loss falls well below its start.
    The book's shipped model with chapter 8's QLoRA defaults (a 4-bit base, LoRA on every linear
    layer, paged AdamW, clipping at 0.3); a random tiny model would not do, as its frozen random
    head caps how confident any adapter can make it."""
    data = tmp_path / "four.jsonl"
    pairs = [("What is the capital of France?", "Paris, on the Seine."),
             ("Which number follows seven?", "Eight comes after seven."),
             ("Name a primary colour.", "Red is a primary colour."),
             ("What do bees make?", "Bees make honey and wax.")]
    data.write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in pairs))
    cfg = TrainConfig(data=str(data), output=str(tmp_path), eval_fraction=0.0, max_eval_samples=1,
                      target_max_len=32, lora_r=8, lora_dropout=0.0, learning_rate=3e-3,
                      lr_scheduler_type="constant", max_steps=40, per_device_train_batch_size=4,
                      gradient_accumulation_steps=1, eval_steps=0, save_steps=1000, seed=0)
    run = setup_run(cfg)
    losses = [train_step(run)["loss"] for _ in range(cfg.max_steps)]
    assert losses[-1] < 0.25 * losses[0], losses      # measured: 6.7 -> 0.68
