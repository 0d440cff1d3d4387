"""`python -m qlora_mini.studies.experiments datatypes` on a tiny local model: the JSON it writes
(entries, provenance), that a rerun resumes instead of recomputing, and the CLI; with
chapter 13's sweep command, how both refuse a damaged results file or an unknown size."""
import json
import subprocess
import sys

import pytest
import torch

from qlora_mini.studies import experiments as E
from qlora_mini.studies.datatypes import DATA_TYPES, window_nll
from tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def fewer_tokens(monkeypatch):
    """Score 8 windows of 128 tokens instead of 256 (the sweep's logic is the same)."""
    monkeypatch.setattr(E, "EVAL_TOKENS", 1024)


def test_sweep_writes_every_entry_with_provenance(tiny_dir, tmp_path, fewer_tokens):
    result = E.run_datatypes(str(tiny_dir), blocksizes=(64,), out_dir=tmp_path, progress=False)
    saved = json.loads(next(tmp_path.glob("*-seed0.json")).read_text())
    assert saved == json.loads(json.dumps(result))
    assert list(saved["entries"]) == ["16-bit"] + [f"{d} | 64" for d in DATA_TYPES]
    assert all(len(e["nll"]) == 8 for e in saved["entries"].values())
    assert saved["entries"]["16-bit"]["weight_mse"] is None
    assert 0 < saved["entries"]["NF4 | 64"]["weight_mse"] < saved["entries"]["Int4 | 64"]["weight_mse"]
    assert saved["machine"]["cores"] >= 1 and saved["versions"]["torch"] == torch.__version__
    assert saved["wall_s"] > 0 and saved["date"][:2] == "20"


def test_rerun_resumes(tiny_dir, tmp_path, fewer_tokens, monkeypatch):
    first = E.run_datatypes(str(tiny_dir), blocksizes=(64,), out_dir=tmp_path, progress=False)
    path = next(tmp_path.glob("*-seed0.json"))
    partial = json.loads(path.read_text())
    del partial["entries"]["FP4 (E3M0) | 64"]            # as if killed before this entry
    path.write_text(json.dumps(partial))
    calls = []
    monkeypatch.setattr(E, "window_nll", lambda *a: calls.append(1) or window_nll(*a))
    again = E.run_datatypes(str(tiny_dir), blocksizes=(64,), out_dir=tmp_path, progress=False)
    assert len(calls) == 1
    assert again["entries"] == first["entries"]            # deterministic, and in the same order
    assert list(again["entries"]) == list(first["entries"])


def test_cli_refuses_unknown_experiment(capsys):
    with pytest.raises(SystemExit):
        E.main(["sizes"])
    assert "invalid choice" in capsys.readouterr().err


def command(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(run: subprocess.CompletedProcess, says: str):
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and run.stderr.startswith("error: ") and says in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.processes
@pytest.mark.parametrize("damage, says", [('{"entries": {"16-bit": {"nll": [4.1, ', "not valid JSON"),
                                          ('{"runs": [], "entries": []}', "object, so no run")])
@pytest.mark.parametrize("module", ["qlora_mini.studies.experiments", "qlora_mini.studies.finetuning"])
def test_a_damaged_results_file_is_refused_and_kept(tiny_dir, tmp_path, module, damage, says):
    """A truncated file, or one of another shape, where the sweep would resume: one line naming
    it, exit 2, the file as it was (chapter 12's sweep and chapter 13's both read it back)."""
    if module == "qlora_mini.studies.experiments":
        path, args = tmp_path / f"{str(tiny_dir).replace('/', '--')}-seed0.json", ["datatypes"]
    else:
        path, args = tmp_path / f"{tiny_dir.name}.json", ["compare", "--seeds", "0"]
    path.write_text(damage)
    run = command(module, *args, "--sizes", str(tiny_dir), "--out", str(tmp_path))
    assert_one_line_error(run, says)
    assert str(path) in run.stderr and path.read_text() == damage


@pytest.mark.processes
@pytest.mark.parametrize("module, args", [("qlora_mini.studies.experiments", ["datatypes"]),
                                          ("qlora_mini.studies.finetuning", ["compare"])])
def test_an_unknown_size_is_refused_before_any_work(tmp_path, module, args):
    out = tmp_path / "out"
    run = command(module, *args, "--sizes", "h999-l1", "--out", str(out))
    assert_one_line_error(run, "unknown size 'h999-l1'")
    assert not out.exists()


@pytest.mark.processes
def test_ctrl_c_keeps_the_finished_entries_without_a_traceback(tiny_dir, tmp_path):
    """A SIGINT mid-sweep (a real process): one line saying where the entries are and how to
    resume, exit status 130, and a results file that is whole and that a rerun completes."""
    import signal
    import time
    args = [sys.executable, "-m", "qlora_mini.studies.experiments", "datatypes", "--sizes",
            str(tiny_dir), "--out", str(tmp_path), "--blocksizes", "64", "128", "256", "512",
            "1024", "2048"]
    # a shell that starts jobs in the background (nohup ... &) hands them SIGINT ignored, and
    # Python then keeps ignoring it: give the sweep the default disposition, as a terminal would
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    path = tmp_path / f"{str(tiny_dir).replace('/', '--')}-seed0.json"
    deadline = time.time() + 240
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in err
    last = err.strip().splitlines()[-1]                  # progress bars come before it
    assert last.startswith("interrupted:") and str(tmp_path) in last and "resume" in last
    kept = json.loads(path.read_text())["entries"]
    assert 1 <= len(kept) < 1 + 6 * len(DATA_TYPES)
    again = subprocess.run(args[:-5], capture_output=True, text=True, timeout=300)  # blocksize 64
    assert again.returncode == 0
    resumed = json.loads(path.read_text())["entries"]
    assert len(resumed) == 1 + len(DATA_TYPES) and resumed["16-bit"] == kept["16-bit"]
