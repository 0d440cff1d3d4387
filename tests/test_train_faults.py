"""The training and evaluation commands under bad input and faults (chapter 8): a clear error
(exit code 2, one line a problem, no traceback), nothing non-finite written, nothing mixed up.
Process faults use real subprocesses and SIGKILL; file faults damage real files."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_mini import evaluate as E
from qlora_mini import train as T
from tiny_model import make_tiny_model, train_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


_args = train_args


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    T.main(_args(tiny, out))
    return out


def _exit(args, capsys, code=2, main=T.main) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == code
    return capsys.readouterr().err


def _adapter(folder):
    return load_file(Path(folder) / "adapter_model.safetensors")


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("setting, message", [
    ("per_device_train_batch_size=0", "per_device_train_batch_size=0: must be > 0"),
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps=0: must be > 0"),
    ("max_steps=0", "max_steps=0: must be > 0"), ("max_steps=-3", "max_steps=-3: must be > 0"),
    ("eval_fraction=1.0", "eval_fraction=1.0: must be in [0, 1)"),
    ("eval_fraction=-0.5", "eval_fraction=-0.5: must be in [0, 1)"),
    ("quant_type=nf5", "quant_type='nf5': allowed nf4, fp4"),
    ("lora_dropout=-0.1", "lora_dropout=-0.1: must be in [0, 1)")])
def test_bad_config_fails_before_the_model_loads(tmp_path, capsys, setting, message):
    missing_model = tmp_path / "no-model-here"       # never touched: the config fails first
    args = _args(missing_model, tmp_path / "out", "--set", setting)
    if setting.startswith("max_steps"):
        args[args.index("--max-steps") + 1] = setting.split("=")[1]
    err = _exit(args, capsys)
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_every_problem_gets_its_own_line(tmp_path, capsys):
    err = _exit(_args(tmp_path, tmp_path / "o", "--set", "lora_r=0", "--set",
                      "per_device_train_batch_size=0"), capsys)
    assert len([l for l in err.splitlines() if l.startswith("error: ")]) == 2


@pytest.mark.parametrize("content", ["", "[]"])
def test_empty_data(tiny, tmp_path, capsys, content):
    data = tmp_path / ("d.jsonl" if not content else "d.json")
    data.write_text(content)
    err = _exit(_args(tiny, tmp_path / "o", "--data", str(data)), capsys)
    assert "no training records" in err and str(data) in err


def test_latin1_file_is_named(tiny, tmp_path, capsys):
    data = tmp_path / "latin.jsonl"
    data.write_bytes('{"input": "caf\xe9", "output": "ok"}\n'.encode("latin-1"))
    err = _exit(_args(tiny, tmp_path / "o", "--data", str(data)), capsys)
    assert f"{data}: not UTF-8 text" in err


def test_missing_local_path_is_announced_as_a_hub_id(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    err = _exit(_args(tiny, tmp_path / "o", "--data", str(tmp_path / "mydata")), capsys)
    assert "not found locally; treating it as a hub dataset id" in err
    assert "could not be loaded from the hub" in err and "Traceback" not in err


def test_a_model_that_cannot_be_loaded(tmp_path, capsys):
    err = _exit(_args(tmp_path / "no-model-here", tmp_path / "o"), capsys)
    assert "no-model-here" in err and "Traceback" not in err


def test_sequences_longer_than_the_model(tiny, tmp_path, capsys):
    err = _exit(_args(tiny, tmp_path / "o", "--set", "target_max_len=5000"), capsys)
    assert "exceeds the model's max_position_embeddings = 1024" in err


def test_diverging_run_stops_and_writes_nothing_non_finite(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    err = _exit(_args(tiny, out, "--set", "learning_rate=1e30", "--set", "max_grad_norm=0",
                      "--set", "save_steps=1"), capsys, code=3)
    assert "not finite; stopped before the update" in err
    assert not (out / "adapter").exists()               # no final adapter
    for ck in out.glob("checkpoint-*"):                  # the checkpoints before it are finite
        assert all(torch.isfinite(t).all() for t in _adapter(ck / "adapter").values())
    summary = {"loss": float("nan"), "step": 3}          # the summary line is valid JSON
    assert json.loads(json.dumps(T._json_safe(summary), allow_nan=False))["loss"] is None


def test_corrupted_latest_checkpoint_falls_back(tiny, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "adapter")
    weights = out / "checkpoint-4" / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    T.main(_args(tiny, out, "--resume"))
    said = capsys.readouterr().out
    assert "skipping checkpoint-4: optimizer.safetensors does not match its manifest" in said
    assert _same(_adapter(out / "adapter"), _adapter(reference / "adapter"))


def test_resume_with_a_different_config(tiny, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for ck in ("checkpoint-4", "adapter"):
        shutil.rmtree(out / ck)
    err = _exit(_args(tiny, out, "--resume", "--set", "learning_rate=1e-4"), capsys)
    assert "learning_rate: 0.003 -> 0.0001 (breaks exact continuation; pass --force" in err
    err = _exit(_args(tiny, out, "--resume", "--force", "--set", "lora_r=8"), capsys)
    assert "lora_r: 4 -> 8 (the checkpoint's adapters have the old shape)" in err
    T.main(_args(tiny, out, "--resume", "--force", "--set", "learning_rate=1e-4"))
    assert "learning_rate: 0.003 -> 0.0001 (applied)" in capsys.readouterr().out
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == [3e-3, 3e-3, 1e-4, 1e-4]


def _popen(args, **env):
    return subprocess.Popen([sys.executable, "-m", "qlora_mini.train", *args], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.processes
def test_two_runs_cannot_share_an_output(tiny, reference, tmp_path, capsys):
    out = tmp_path / "run"
    first = _popen(_args(tiny, out), QLORA_MINI_PAUSE_AFTER_SAVE="2")
    for line in first.stdout:
        if line.startswith("PAUSED after checkpoint-2"):
            break
    try:
        err = _exit(_args(tiny, out, "--resume"), capsys)
        assert f"in use by another training run (pid {first.pid})" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    T.main(_args(tiny, out, "--resume"))          # the dead run's lock is gone with it
    assert _same(_adapter(out / "adapter"), _adapter(reference / "adapter"))


def test_fresh_run_refuses_an_old_run_unless_overwrite(tiny, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    err = _exit(_args(tiny, out, "--seed", "1"), capsys)
    assert "holds 2 checkpoint(s) of an earlier run" in err and "--overwrite" in err
    (out / "checkpoint-6").mkdir()                 # an old run's later checkpoint must go too
    T.main(_args(tiny, out, "--seed", "1", "--overwrite"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["config"]["seed"] == 1


def test_evaluate_refuses_missing_or_truncated_adapters(tiny, reference, tmp_path, capsys):
    err = _exit(["--model", str(tiny), "--adapter", str(tmp_path / "none")], capsys, main=E.main)
    assert "adapter_config.json: no such file" in err
    bad = tmp_path / "adapter"
    shutil.copytree(reference / "adapter", bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    err = _exit(["--model", str(tiny), "--adapter", str(bad)], capsys, main=E.main)
    assert f"{weights}: not a readable safetensors file" in err
