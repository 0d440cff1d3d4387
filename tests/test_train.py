"""`python -m qlora_mini.train` (chapter 8): runs, resumes exactly after SIGKILL, saves atomically."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_mini import train as T
from qlora_mini.checkpoint import checkpoints
from tiny_model import make_tiny_model, train_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


_args = train_args


def _adapter(folder):
    return load_file(Path(folder) / "adapter_model.safetensors")


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _subprocess(args, **env):
    return subprocess.Popen([sys.executable, "-m", "qlora_mini.train", *args], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    summary = T.main(_args(tiny, out))
    return out, summary


def test_run_writes_log_plot_checkpoints(reference):
    out, summary = reference
    assert summary["step"] == 4 and summary["eval_loss"] > 0
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 5))
    assert (out / "loss.png").stat().st_size > 0
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    ck = out / "checkpoint-2"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "optimizer.safetensors", "optimizer.json", "rng.safetensors", "trainer_state.json"):
        assert (ck / name).is_file(), name
    assert json.loads((ck / "trainer_state.json").read_text())["microbatch"] == 2 * 2


@pytest.mark.processes
def test_kill_during_save_leaves_no_broken_checkpoint(tiny, reference, tmp_path):
    """A real SIGKILL halfway through writing checkpoint-4, the last (after the adapter, before
    the optimizer): the half-written folder never appears under its name; resuming from
    checkpoint-2 ends with the same adapters and log as an uninterrupted run, bit for bit. (A
    kill right after a complete checkpoint: test_train_faults.test_two_runs_cannot_share_an_output;
    a killed process of two: test_distributed.)"""
    proc = _subprocess(_args(tiny, tmp_path), QLORA_MINI_KILL_DURING_SAVE="4")
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "checkpoint-4").exists()          # never half-written under its name
    partial = list(tmp_path.glob(".tmp-checkpoint-4-*"))
    assert partial and (partial[0] / "adapter").is_dir() and not (partial[0] / "optimizer.json").exists()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2"]
    T.main(_args(tiny, tmp_path, "--resume"))
    assert not list(tmp_path.glob(".tmp-*"))
    assert _same(_adapter(tmp_path / "adapter"), _adapter(reference[0] / "adapter"))
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(l) for l in (reference[0] / "log.jsonl").read_text().splitlines()]
    assert log == ref_log


def _cli_error(args, capsys) -> str:
    """Run the command, expect exit code 2 (a user error, no traceback); return stderr."""
    with pytest.raises(SystemExit) as e:
        T.main(args)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_config_key(tiny, tmp_path, capsys):
    err = _cli_error(_args(tiny, tmp_path, "--set", "lora_rank=8"), capsys)
    assert "unknown config key 'lora_rank'" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1e-4\nbatch_size: 4\n")
    err = _cli_error(["--config", str(bad), "--model", str(tiny), "--output", str(tmp_path)], capsys)
    assert "bad.yaml: unknown config key 'batch_size'" in err
    assert "lora_r='many' is not a valid int" in _cli_error(
        _args(tiny, tmp_path, "--set", "lora_r=many"), capsys)
    assert "no such preset" in _cli_error(["--config", "guanaco-1b", "--output", str(tmp_path)],
                                          capsys)


def test_missing_data_file_and_malformed_record(tiny, tmp_path, capsys):
    err = _cli_error(_args(tiny, tmp_path, "--data", str(tmp_path / "nope.jsonl")), capsys)
    assert re.search("data file not found: .*nope.jsonl", err)
    data = tmp_path / "d.jsonl"
    data.write_text('{"input": "a", "output": "b"}\n' * 9 + '{"input": "a", "answer": "b"}\n')
    err = _cli_error(_args(tiny, tmp_path / "o", "--data", str(data),
                           "--set", "dataset_format=input-output"), capsys)
    assert re.search(r"d.jsonl \(\w+ record \d+\): missing field 'output'", err)


def test_presets_follow_the_paper():
    for size, lr, dropout in [("7b", 2e-4, 0.1), ("13b", 2e-4, 0.05), ("33b", 1e-4, 0.05),
                              ("65b", 1e-4, 0.05)]:
        c = T.load_config(f"guanaco-{size}")
        assert (c.learning_rate, c.lora_dropout, c.lora_r, c.lora_alpha) == (lr, dropout, 64, 16)
        assert (c.per_device_train_batch_size * c.gradient_accumulation_steps, c.max_steps) == (16, 1875)
        assert (c.lr_scheduler_type, c.warmup_ratio, c.adam_beta2, c.max_grad_norm) == (
            "constant", 0.03, 0.999, 0.3)
        assert c.optim == "paged_adamw_32bit" and c.gradient_checkpointing and c.group_by_length
        assert (c.source_max_len, c.target_max_len, c.quant_type, c.double_quant) == (16, 512, "nf4", True)


def test_lr_schedules_match_transformers():
    from transformers import get_scheduler
    for kind in ("constant", "constant_with_warmup", "linear", "cosine"):
        cfg = T.TrainConfig(lr_scheduler_type=kind, max_steps=40, warmup_ratio=0.1)
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = get_scheduler(kind, opt, num_warmup_steps=4, num_training_steps=40)
        for step in range(40):
            assert abs(opt.param_groups[0]["lr"] - T.lr_factor(cfg, step)) < 1e-12, (kind, step)
            opt.step(), sched.step()


def test_plain_lora_without_quantization(tiny, tmp_path):
    from qlora_mini.lora import LoRALinear
    cfg = T.load_config("default", {"model": str(tiny), "quantize": False, "lora_r": 4})
    model = T.build_model(cfg)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(type(m.base) is torch.nn.Linear for m in layers)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    summary = T.main(_args(tiny, tmp_path, "--set", "quantize=false", "--max-steps", "2"))
    assert summary["step"] == 2 and (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_checkpoint_adapter_files_are_save_adapters(tiny, tmp_path):
    """The checkpoint's adapter (checkpoint.adapter_tensors: whole tensors, so that a sharded
    model can be saved too, passed to lora.save_adapter) has the very bytes of save_adapter on the
    model itself (chapter 6's PEFT files)."""
    from qlora_mini.checkpoint import adapter_tensors
    from qlora_mini.lora import save_adapter
    from qlora_mini.recipe import Processes
    model = T.build_model(T.load_config("default", {"model": str(tiny), "lora_r": 4}))
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_()                             # lora_B is zero at initialization
    save_adapter(model, tmp_path / "ours", adapter_tensors(model, Processes()))
    save_adapter(model, tmp_path / "lora")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "lora" / name).read_bytes()


@pytest.mark.parametrize("keep, left", [(2, [7, 10]), (None, [1, 3, 7, 10]), (0, [1, 3, 7, 10]),
                                        (9, [1, 3, 7, 10])])
def test_prune_checkpoints_keeps_the_newest(tmp_path, keep, left):
    """save_total_limit: numeric order (10 after 7, not after 1), only complete checkpoints count,
    and a temporary folder and a checkpoint without trainer_state.json are left alone."""
    from qlora_mini.checkpoint import prune_checkpoints
    for step in (1, 3, 7, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-2").mkdir()                       # incomplete: no trainer_state.json
    (tmp_path / ".tmp-checkpoint-12-x").mkdir()
    prune_checkpoints(tmp_path, keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".tmp-checkpoint-12-x", "checkpoint-2"] + [f"checkpoint-{s}" for s in left])
