"""QLoRA on FSDP2 (chapter 11), with real processes: two gloo processes on this CPU follow one
process step for step, in the demo and in the training command (`torchrun -m
qlora_mini.distributed`: chapter 8's command with FSDPProcesses),
which also resumes exactly after one of its processes is SIGKILLed; bad splits, meshes, models and
numbers of processes are clear errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from qlora_mini import distributed as D
from qlora_mini import train as T
from qlora_mini.memory import llama_config, qlora_memory
from tiny_model import make_tiny_model, train_args

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.processes  # torchrun launches: `make test`, not `make unit`
STEPS = 4
# The training command's runs: 10 steps, a checkpoint every 4, dropout off so that one and two
# processes compute the same thing (each process draws its own dropout masks), 2 sequences x 1
# accumulation x 2 processes = the one-process run's 2 x 2 x 1.
CLI = ("--max-steps", "10", "--set", "save_steps=4", "--set", "lora_dropout=0")
TWO = ("--set", "gradient_accumulation_steps=1")


def _torchrun(*args, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Three torchrun launches of two processes (each pays ~20 s of CPU to start): the demo and
    then an uninterrupted run of the training command (tests/torchrun_two_runs.py); the command
    (`-m qlora_mini.distributed`) with process 1 SIGKILLed when step 6 starts; the same with
    --resume."""
    root = tmp_path_factory.mktemp("fsdp")
    tiny = make_tiny_model(root / "tiny")
    done = {"first": _torchrun("tests/torchrun_two_runs.py", str(STEPS), str(root / "demo.pt"),
                               *train_args(tiny, root / "two", *CLI, *TWO))}
    assert done["first"].returncode == 0, done["first"].stderr[-3000:]
    command = ("-m", "qlora_mini.distributed", *train_args(tiny, root / "resumed", *CLI, *TWO))
    done["killed"] = _torchrun(*command, QLORA_MINI_KILL_RANK="1:6")
    done["left"] = sorted(p.name for p in (root / "resumed").glob("checkpoint-*"))
    done["resumed"] = _torchrun(*command, "--resume")
    return root, tiny, done


@pytest.fixture(scope="module")
def runs(launched):
    single = D.demo_run(STEPS)                          # one process, no FSDP, same batches
    return torch.load(launched[0] / "demo.pt"), single


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
    assert D.demo_main(["--steps", "1", "--global-batch", "3", "--out", str(tmp_path / "x.pt")]) == 2
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


@pytest.fixture(scope="module")
def cli(launched):
    root, tiny, done = launched
    T.main(train_args(tiny, root / "one", *CLI))                 # 1 process, accumulation 2
    return root, tiny, {**done, "two": done["first"]}


def _log(folder) -> list:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _adapter(folder) -> dict:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def test_command_on_two_processes_equals_one_process(cli):
    root, _, runs = cli
    assert runs["two"].returncode == 0, runs["two"].stderr[-3000:]
    two, one = _log(root / "two"), _log(root / "one")
    assert [r["step"] for r in two] == list(range(1, 11))          # process 0 logs, once a step
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-6)
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], abs=1e-6)  # the gradients
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], abs=1e-5)
    assert _max_diff(_adapter(root / "two"), _adapter(root / "one")) < 1e-5    # fp32 order
    summary = [line for line in runs["two"].stdout.splitlines() if line.startswith("{")]
    assert len(summary) == 1 and json.loads(summary[0])["step"] == 10  # printed by process 0


def test_killed_process_then_resume_gives_the_uninterrupted_adapters(cli):
    root, _, runs = cli
    assert runs["killed"].returncode != 0
    assert "Signal 9 (SIGKILL)" in runs["killed"].stderr           # torchrun's report
    assert runs["left"] == ["checkpoint-4"]
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-3000:]
    ref, got = _adapter(root / "two"), _adapter(root / "resumed")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert _log(root / "resumed") == _log(root / "two")


def test_resume_with_another_number_of_processes(cli, tmp_path, capsys):
    """A checkpoint holds whole tensors, so one process can continue a two-process run; but the
    global batch and each process's micro-batches change: refused without --force."""
    root, tiny, _ = cli
    out = tmp_path / "run"
    shutil.copytree(root / "two", out)
    for name in ("adapter", "checkpoint-10"):
        shutil.rmtree(out / name)
    with pytest.raises(SystemExit) as e:
        T.main(train_args(tiny, out, *CLI, "--resume", *TWO))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "processes: 2 -> 1 (breaks exact continuation; pass --force to apply it)" in err
    T.main(train_args(tiny, out, *CLI, "--resume", "--force"))   # accumulation 2: same batch
    assert "resume: processes: 2 -> 1 (applied)" in capsys.readouterr().out
    assert _max_diff(_adapter(out), _adapter(root / "two")) < 1e-5


def test_a_process_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="process 1 of this machine has no GPU of its own: the "
                                         "machine has 1, so run at most 1 processes a machine"):
        D.init_distributed()


def test_checkpoint_keeps_each_process_rng(tmp_path):
    """Process r restores its own RNG state (its dropout masks), checked without processes: a
    stand-in for process 1 of 2 whose gather returns both processes' states."""
    from qlora_mini.checkpoint import _rng_state, load_checkpoint, save_checkpoint
    from qlora_mini.lora import prepare_qlora
    from qlora_mini.recipe import Processes
    states = []
    for seed in (1, 2):                                  # process 0's state, process 1's
        torch.manual_seed(seed)
        states.append(_rng_state())

    class Second(Processes):
        rank, world = 1, 2

        def gather(self, obj):
            return states

    model = prepare_qlora(D._tiny_llama(0), r=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    x = torch.zeros(1, 4, dtype=torch.long)                                # (B, T)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    folder = save_checkpoint(tmp_path, model, opt, sched, {"step": 1, "microbatch": 2},
                             T.TrainConfig(output=str(tmp_path)), Second())
    for processes, want in ((Second(), states[1]), (Processes(), states[0])):
        torch.manual_seed(3)
        load_checkpoint(folder, model, opt, sched, processes)
        assert torch.equal(torch.get_rng_state(), want[0]["torch"])


def test_only_process_0_prints_and_the_null_file_is_closed(monkeypatch, capsys):
    """The command on process 1 of 2 (stand-ins for torchrun's group): chapter 8's command gets the
    FSDPProcesses object, its standard output goes to /dev/null, and that file is closed and
    sys.stdout restored when the command ends."""
    seen = {}

    def command(argv, processes):                 # stands in for chapter 8's main
        seen.update(argv=argv, rank=processes.rank, world=processes.world, stdout=sys.stdout)
        print("a line that process 1 must not print")
        return {"step": 1}

    monkeypatch.setattr(D, "init_distributed", lambda: (1, 2))
    monkeypatch.setattr(D, "train_main", command)
    monkeypatch.setattr(D.dist, "destroy_process_group", lambda: seen.update(destroyed=True))
    before = sys.stdout
    assert D.main(["--max-steps", "1"]) == {"step": 1}
    assert seen["argv"] == ["--max-steps", "1"] and (seen["rank"], seen["world"]) == (1, 2)
    assert seen["stdout"] is not before and seen["stdout"].name == os.devnull
    assert seen["stdout"].closed and sys.stdout is before and seen["destroyed"]
    assert "must not print" not in capsys.readouterr().out


@pytest.mark.processes
@pytest.mark.parametrize("args, says", [(["--steps", "-1"], "--steps must be >= 1"),
                                        (["--global-batch", "0"], "--global-batch must be >= 1"),
                                        (["--out", "NODIR/r.pt"], "its folder does not exist")])
def test_demo_refuses_nonsense_before_it_runs(tmp_path, args, says):
    """Issue 29: `--steps -1` used to exit 0 with an empty result, and a missing --out folder to
    fail only after the whole run."""
    import subprocess
    import sys
    args = [a.replace("NODIR", str(tmp_path / "nodir")) for a in args]
    out = ["--out", str(tmp_path / "r.pt")] if "--out" not in args else []
    run = subprocess.run([sys.executable, "-m", "qlora_mini.distributed", "demo", *args, *out],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr and says in run.stderr
    assert not (tmp_path / "r.pt").exists()
