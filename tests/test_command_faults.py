"""Commands under faults (issue 29), in real processes with real files: the GPU lab (bench/lab.py)
refuses bad numbers and an output it could not write before any work, with one `error:` line and
exit status 2, and keeps the steps it finished when it crashes; a finetuning sweep leaves no
temporary folder, even when it fails, and a Ctrl-C ends it in one line (exit status 130) with its
file whole and resumable; PagedAdamW's CPU notice comes once, also under torchrun."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_mini.studies import finetuning as F
from tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "bench" / "lab.py"
NOTICE = "PagedAdamW: parameters are not on a CUDA device"
THREE_RATES = (1e-3, 3e-3, 1e-2)
# A small sweep, in a child process: the budget of tests/test_finetuning.py and the adapters'
# learning rates given as the first argument ("1e-3" or "1e-3,3e-3,1e-2").
SMALL_SWEEP = """
import signal, sys
from qlora_mini.studies import finetuning as F
signal.signal(signal.SIGINT, signal.default_int_handler)   # even where the shell ignores Ctrl-C
F.BUDGET.update(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                target_max_len=32, max_eval_samples=4)
F.LEARNING_RATES.update(adapters=tuple(float(lr) for lr in sys.argv[1].split(",")))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def _python(code: str, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=600)


def _one_error_line(stderr: str, *words) -> str:
    """The single stderr line that says error, with every word in it; no traceback."""
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert "Traceback" not in stderr and len(errors) == 1, stderr
    assert all(word in errors[0] for word in words), errors[0]
    return errors[0]


# --- the GPU lab -----------------------------------------------------------------------------

@pytest.mark.parametrize("out", ["/proc/lab.json", "{tmp}/no-such-folder/lab.json", "{tmp}"])
def test_lab_refuses_an_output_it_cannot_write_before_any_work(tmp_path, out):
    """Before: every step ran, then the write died with a traceback and all results were lost."""
    out = out.format(tmp=tmp_path)
    done = subprocess.run([sys.executable, str(LAB), "--out", out], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    line = _one_error_line(done.stderr, out)
    assert line.startswith("error: --out") and done.stderr.strip().splitlines()[-1] == line
    assert list(tmp_path.iterdir()) == []                        # not even a temporary file


@pytest.mark.parametrize("setting", ["--cap-gib=nan", "--cap-gib=inf", "--cap-gib=-2",
                                     "--layers=-1"])
def test_lab_refuses_nonsense_numbers(tmp_path, setting):
    done = subprocess.run([sys.executable, str(LAB), setting], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    _one_error_line(done.stderr, setting.split("=")[0], setting.split("=")[1])


LAB_CRASH = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("bench_lab", sys.argv[1])
lab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lab)
def kernels(args):
    return {"path": "measured"}
def gpu_tests(args):                  # a crash no step survives: the driver, the OOM killer
    os.kill(os.getpid(), signal.SIGKILL)
lab.STEP_FUNCTIONS.update(kernels=kernels, gpu_tests=gpu_tests)
args = lab.parse_args(["--steps", "kernels,gpu_tests,dequant_bench", "--out", sys.argv[2]])
result = dict(what="w", date="d", versions={}, device={"name": "none"}, args={}, steps={})
sys.exit(lab.run_lab(args, result, args.out))
"""


@pytest.mark.processes
def test_lab_killed_mid_way_keeps_the_steps_it_finished(tmp_path):
    out = tmp_path / "lab.json"
    done = _python(LAB_CRASH, LAB, out)
    assert done.returncode == -signal.SIGKILL, done.stderr
    result = json.loads(out.read_text())
    assert list(result["steps"]) == ["kernels"] and result["steps"]["kernels"]["status"] == "ok"
    assert result["steps"]["kernels"]["path"] == "measured"
    assert result["pending"] == ["gpu_tests", "dequant_bench"]
    assert [p.name for p in tmp_path.iterdir()] == ["lab.json"]   # no temporary file left


# --- the finetuning sweep --------------------------------------------------------------------

SWEEP_THEN_FAIL = SMALL_SWEEP + """
finetune, calls = F.finetune, []
def failing_finetune(*args, **kw):    # the second run fails (a full disk, a bad shard, a bug)
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("the second run broke")
    return finetune(*args, **kw)
if sys.argv[2] == "fail":
    F.finetune = failing_finetune
F.run_sweep(sys.argv[3], "placement", seeds=(0,), out_dir=sys.argv[4], progress=False)
"""


@pytest.mark.processes
@pytest.mark.parametrize("outcome", ["finish", "fail"])
def test_sweep_leaves_no_temporary_folder(tiny, tmp_path, outcome):
    """Before: every sweep left a tempfile.mkdtemp() folder (its MCQ test) behind."""
    scratch, out = tmp_path / "tmp", tmp_path / "out"
    scratch.mkdir()
    done = _python(SWEEP_THEN_FAIL, "1e-3", outcome, tiny, out, env={"TMPDIR": str(scratch)})
    runs = json.loads((out / f"{tiny.name}.json").read_text())["runs"]
    if outcome == "fail":
        assert done.returncode == 1 and "the second run broke" in done.stderr
        assert len(runs) == 1                      # the run before the failure is kept
    else:
        assert done.returncode == 0, done.stderr
        assert len(runs) == len(F.PLACEMENTS)
    assert list(scratch.iterdir()) == []


SWEEP_COMMAND = SMALL_SWEEP + """
sys.exit(F.main(["placement", "--sizes", sys.argv[2], "--seeds", "0", "--out", sys.argv[3]]))
"""


@pytest.mark.processes
def test_ctrl_c_ends_a_sweep_in_one_line_and_it_resumes(tiny, tmp_path, monkeypatch):
    """SIGINT once the file holds a run: exit status 130, one line naming the file, no
    traceback, no temporary folder; the file is whole, and the same sweep resumes from it."""
    scratch, out = tmp_path / "tmp", tmp_path / "out"
    scratch.mkdir()
    path = out / f"{tiny.name}.json"                    # the sweep file of a model folder
    rates = ",".join(map(str, THREE_RATES))
    sweep = subprocess.Popen([sys.executable, "-c", SWEEP_COMMAND, rates, str(tiny), str(out)],
                             cwd=ROOT, env={**os.environ, "TMPDIR": str(scratch)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (path.exists() and json.loads(path.read_text())["runs"]):
            assert sweep.poll() is None and time.monotonic() < deadline, "no run was written"
            time.sleep(0.2)
        sweep.send_signal(signal.SIGINT)
        stdout, stderr = sweep.communicate(timeout=120)
    finally:
        sweep.kill()
    assert sweep.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    interrupted = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert len(interrupted) == 1 and str(path) in interrupted[0]
    assert "same command resumes" in interrupted[0]
    assert list(scratch.iterdir()) == []
    kept = json.loads(path.read_text())["runs"]
    monkeypatch.setattr(F, "LEARNING_RATES", dict(F.LEARNING_RATES, adapters=THREE_RATES))
    every_run = {F.run_key(*k) for k in F.runs("placement", seeds=(0,))}
    assert kept and set(kept) < every_run                    # interrupted, not finished

    # The same sweep again, in this process, with a fast stand-in for training: the kept runs stay
    # as they are, and exactly the missing ones run.
    trained = []

    def stand_in(cfg, variant, mcq_folder):
        trained.append(cfg.learning_rate)
        return dict(variant=variant, eval_loss=1.0)

    monkeypatch.setattr(F, "finetune", stand_in)
    F.run_sweep(str(tiny), "placement", seeds=(0,), out_dir=out, progress=False)
    resumed = json.loads(path.read_text())["runs"]
    assert set(resumed) == every_run and all(resumed[k] == kept[k] for k in kept)
    assert len(trained) == len(every_run) - len(kept)


# --- PagedAdamW's CPU notice -------------------------------------------------------------------

TWO_OPTIMIZERS = """
import warnings
import torch
from qlora_mini.paged import PagedAdamW
first = PagedAdamW([torch.nn.Parameter(torch.zeros(3))])
with warnings.catch_warnings():       # touching the filters resets Python's once-per-line memory
    warnings.simplefilter("ignore", DeprecationWarning)
second = PagedAdamW([torch.nn.Parameter(torch.ones(2))], lr=1e-2)
"""


def test_paged_notice_once_a_process():
    """Before: every optimizer built on a CPU repeated the notice (each call site, each run)."""
    done = _python(TWO_OPTIMIZERS)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(NOTICE) == 1 and "UserWarning" in done.stderr


TORCHRUN_OPTIMIZER = """
import torch
import torch.distributed as dist
from qlora_mini.paged import PagedAdamW
dist.init_process_group("gloo")
PagedAdamW([torch.nn.Parameter(torch.zeros(3))])
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.processes
def test_paged_notice_once_under_torchrun(tmp_path):
    """Two processes, each with its optimizer: process 0 alone says it."""
    script = tmp_path / "optimizer.py"
    script.write_text(TORCHRUN_OPTIMIZER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(NOTICE) == 1, done.stderr


@pytest.mark.processes
@pytest.mark.parametrize("command", [
    ["qlora_mini.studies.experiments", "datatypes", "--sizes", "h128-l4", "--out", "OUT"],
    ["qlora_mini.studies.experiments", "rebuild", "--out", "OUT"],
    ["qlora_mini.studies.finetuning", "compare", "--out", "OUT"],
    ["qlora_mini.studies.llm_datatypes", "--out", "OUT/r.json"]])
@pytest.mark.parametrize("where", ["/proc/qlora-mini-test", "FILE/below-a-file"])
def test_an_unwritable_output_is_refused_before_any_work(tmp_path, command, where):
    """An --out that cannot hold a file (under /proc, or below a regular file) is refused with
    one line before a model loads, instead of a traceback at the first write."""
    blocker = tmp_path / "FILE"
    blocker.write_text("a file, not a folder")
    out = where.replace("FILE", str(blocker))
    args = [a.replace("OUT", out) for a in command]
    start = time.time()
    run = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("error: ") and len(run.stderr.strip().splitlines()) == 1
    assert time.time() - start < 60                        # no model was loaded or trained
