"""Chapter 13's variants, byte counts, sweep file and statistics, on a tiny local model."""
import json
import math

import numpy as np
import pytest
from scipy import stats
import torch

from qlora_mini.studies import finetuning as F
from qlora_mini.lora import LoRALinear
from qlora_mini.default_model import load_model, weights_sha256
from qlora_mini.train import train
from tiny_model import make_tiny_model

SMALL = dict(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
             target_max_len=32, max_eval_samples=4, lora_r=4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_int4_variant_stores_int4_levels_blockwise(tiny_dir):
    """Every adapted weight is an Int4 round trip: in each block of 64, weight * 7 / absmax is an
    integer in [-7, 7] and within half a level of the original (checked here by arithmetic)."""
    cfg = F.variant_config("QLoRA Int4", tiny_dir, **SMALL)
    model, plain = F.build_variant(cfg, "QLoRA Int4"), load_model(tiny_dir, dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(layers) == 7 * plain.config.num_hidden_layers
    for name, layer in layers.items():
        W = plain.get_submodule(name).weight.detach().reshape(-1, 64)       # (blocks, 64)
        W_hat = layer.base.weight.detach().reshape(-1, 64)
        absmax = W.abs().amax(1, keepdim=True)
        steps = W_hat * 7 / absmax
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 7 + 1e-4
        assert ((W_hat - W).abs() <= absmax / 14 + 1e-6).all()
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("variant", ["full", "LoRA", "QLoRA NF4+DQ", "QLoRA FP4"])
def test_measured_bytes_match_the_accounting(tiny_dir, variant):
    """Two independent counts: the tensors a trained run holds, and chapter 5's formulas."""
    cfg = F.variant_config(variant, tiny_dir, **SMALL)
    result = F.finetune(cfg, variant)
    config = load_model(tiny_dir).config
    assert result["measured_bytes"] == F.accounted_bytes(config, variant, cfg.lora_r)
    n = sum(p.numel() for p in load_model(tiny_dir).parameters())
    lora = sum(4 * (i + o) for i, o in [(64, 64)] * 4 * 2 + [(64, 128)] * 2 * 2 + [(128, 64)] * 2)
    assert result["trainable"] == (n if variant == "full" else lora)


def test_finetune_follows_the_training_command(tiny_dir, tmp_path):
    """Chapter 8's train() (setup_run, checkpoints, log) and finetune() reach the same losses."""
    cfg = F.variant_config("QLoRA NF4+DQ", tiny_dir, output=str(tmp_path / "run"), **SMALL)
    ours = F.finetune(cfg, "QLoRA NF4+DQ")
    theirs = train(cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert ours["train_loss"] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-6)


def test_sweep_resumes_and_records_divergence(tiny_dir, tmp_path, monkeypatch):
    """A sweep file missing one run gets exactly that run; a diverging one is recorded."""
    monkeypatch.setattr(F, "BUDGET", dict(SMALL))
    monkeypatch.setattr(F, "LEARNING_RATES", dict(full=(1e-3,), adapters=(1e-3, 1e30)))
    keys = [F.run_key(*k) for k in F.runs("placement", seeds=(0,))]
    path = tmp_path / f"{tiny_dir.name}.json"
    sha = weights_sha256(tiny_dir)                      # what the kept runs were measured on
    path.write_text(json.dumps(dict(size=str(tiny_dir), weights_sha256=sha,
                                    runs={k: dict(kept=True) for k in keys[1:]})))
    F.run_sweep(str(tiny_dir), "placement", seeds=(0,), out_dir=tmp_path, progress=False)
    runs = json.loads(next(tmp_path.glob("*.json")).read_text())["runs"]
    assert list(runs) != [] and set(runs) == set(keys)
    assert all(runs[k] == dict(kept=True) for k in keys[1:])
    assert runs[keys[0]]["wall_s"] > 0 and runs[keys[0]]["lr"] == 1e-3
    runs_div = F.runs("compare", seeds=(0,))
    bad = next(k for k in runs_div if k[0] == "QLoRA FP4" and k[3] == 1e30)
    path.write_text(json.dumps(dict(size=str(tiny_dir), weights_sha256=sha, runs={
        F.run_key(*k): dict(kept=True) for k in runs_div if k != bad})))
    F.run_sweep(str(tiny_dir), "compare", seeds=(0,), out_dir=tmp_path, progress=False)
    entry = json.loads(path.read_text())["runs"][F.run_key(*bad)]
    assert "not finite" in entry["diverged"] and entry["eval_loss"] is None


@pytest.mark.parametrize("recorded", [{}, {"weights_sha256": "0" * 64}])
def test_sweep_refuses_runs_on_other_weights(tiny_dir, tmp_path, recorded):
    """A file whose runs name other weights, or none, is never resumed onto these: refused,
    naming the file, and left as it was."""
    path = tmp_path / f"{tiny_dir.name}.json"
    path.write_text(json.dumps(dict(size=str(tiny_dir), runs={"a run": {}}, **recorded)))
    before = path.read_text()
    with pytest.raises(ValueError, match=f"{path.name} holds runs measured on weights"):
        F.run_sweep(str(tiny_dir), "placement", seeds=(0,), out_dir=tmp_path, progress=False)
    assert path.read_text() == before


def test_seed_interval_is_scipys_t_interval():
    x = [2.1, 2.4, 1.9, 2.2]
    r = F.seed_interval(x, level=0.9)
    low, high = stats.t.interval(0.9, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert (r["low"], r["high"]) == pytest.approx((low, high)) and r["n"] == 4
    assert math.isnan(F.seed_interval([1.0])["low"])


def _file(losses: dict) -> dict:
    """A sweep file from {(variant, lr): [loss per seed]}."""
    runs = {}
    for (variant, lr), values in losses.items():
        for seed, v in enumerate(values):
            runs[F.run_key(variant, "all linear", 16, lr, seed)] = dict(
                variant=variant, placement="all linear", r=16, lr=lr, seed=seed, eval_loss=v)
    return dict(runs=runs)


def test_best_lr_paired_gap_and_verdicts():
    result = _file({("LoRA", 1e-3): [3.0, 3.1, 3.2], ("LoRA", 1e-2): [2.0, 2.1, 2.2],
                    ("QLoRA FP4", 1e-2): [2.3, 2.45, 2.5], ("QLoRA NF4+DQ", 1e-2): [2.02, 2.1, 2.2]})
    result["runs"]["x"] = dict(variant="QLoRA FP4", placement="all linear", r=16, lr=1e-1, seed=0,
                               diverged="loss not finite", eval_loss=None)
    assert F.best_lr(result, "LoRA") == 1e-2 and F.best_lr(result, "QLoRA FP4") == 1e-2
    gap = F.paired_gap(result, ("QLoRA FP4", "all linear", 16), ("LoRA", "all linear", 16))
    assert gap["mean"] == pytest.approx(np.mean([0.3, 0.35, 0.3])) and gap["n"] == 3
    assert F.verdict(gap, "matches") == "does not hold"
    near = F.paired_gap(result, ("QLoRA NF4+DQ", "all linear", 16), ("LoRA", "all linear", 16))
    assert F.verdict(near, "matches") == "not distinguishable at this scale"
    assert F.verdict(dict(mean=-1, low=-2, high=-0.5), "better") == "holds"
    assert F.verdict(dict(mean=1, low=0.5, high=2), "better") == "does not hold"
    with pytest.raises(ValueError, match="claim"):
        F.verdict(gap, "worse")
    with pytest.raises(ValueError, match="variant"):
        F.variant_config("QLoRA Int8", "x")
