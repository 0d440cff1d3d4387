"""QLoRA on FSDP2 (chapter 11), with real processes: two gloo processes on this CPU follow one
process step for step; bad splits, meshes and models are clear errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from qlora_mini import distributed as D
from qlora_mini.memory import llama_config, qlora_memory

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _torchrun(n: int, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(n), "-m", "qlora_mini.distributed", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "sharded.pt"
    done = _torchrun(2, "--steps", str(STEPS), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    single = D.demo_run(STEPS)                          # one process, no FSDP, same batches
    return torch.load(out), single


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_one_step_loss_and_gradients_equal_one_process(runs):
    sharded, single = runs
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    assert sharded["losses"][0] == pytest.approx(single["losses"][0], abs=1e-6)
    assert _max_diff(sharded["grads"], single["grads"]) < 1e-6   # fp32, summation order


def test_steps_give_the_same_adapters_as_one_process(runs):
    sharded, single = runs
    assert sharded["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert _max_diff(sharded["adapters"], single["adapters"]) < 1e-5
    moved = _max_diff(sharded["adapters"], D.full_tensors(
        __import__("qlora_mini").prepare_qlora(D._tiny_llama(0), r=4, dropout=0.0)))
    assert moved > 1e-3                                   # training did change the adapters


def test_a_batch_that_cannot_be_split_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(D, "init_distributed", lambda: (0, 2))   # as process 0 of 2
    assert D.main(["--steps", "1", "--global-batch", "3", "--out", str(tmp_path / "x.pt")]) == 2
    assert "global_batch=3 cannot be split evenly across 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_bad_mesh_and_bad_model(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from qlora_mini.lora import prepare_qlora
    model = D._tiny_llama(0)
    with pytest.raises(ValueError, match="prepared with prepare_qlora"):
        D.shard_qlora(model)
    prepare_qlora(model, r=4)
    with pytest.raises(ValueError, match="mesh must be 1-D"):
        D.shard_qlora(model, mesh=init_device_mesh("cpu", (1, 1)))


def test_no_process_group_is_a_clear_error():
    from qlora_mini.lora import prepare_qlora
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        D.shard_qlora(prepare_qlora(D._tiny_llama(0), r=4))


def test_memory_per_card_splits_what_fsdp_shards():
    cfg = llama_config("65B")
    whole = qlora_memory(cfg, 1, 512, r=64)
    one, four = D.fsdp_memory(cfg, 1), D.fsdp_memory(cfg, 4)
    assert sum(one.values()) == pytest.approx(sum(whole.values()))   # 1 card: nothing gathered
    assert four["4-bit weights (1/N)"] == pytest.approx(whole["4-bit weights"] / 4)
    assert four["quantization constants (whole)"] == whole["quantization constants"]
    h, V, L = 8192, 32000, 80                       # root: embeddings, lm_head, final norm (bf16)
    assert four["gathered: root weights"] == 2 * (2 * V * h + h)
    layer = (whole["4-bit weights"] + whole["LoRA weights"]) / L
    assert four["gathered: decoder layer(s)"] == pytest.approx(2 * layer)   # with prefetch
    with pytest.raises(ValueError, match="world_size"):
        D.fsdp_memory(cfg, 0)
