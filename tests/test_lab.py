"""Chapter 10's GPU lab, its CPU side: arguments, the refusal without CUDA, the result schema, and
the pieces that run anywhere (random 4-bit layers, the runner catching a failing step)."""
import subprocess
import sys

import pytest
import torch

import qlora_mini  # noqa: F401
from qlora_mini import lab
from qlora_mini.linear4bit import Linear4bit


def test_refuses_without_cuda_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lab.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [lab.NO_CUDA] and "CUDA" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.processes
def test_module_command_exits_2():
    r = subprocess.run([sys.executable, "-m", "qlora_mini.lab"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == lab.NO_CUDA
    assert r.stdout == ""


def test_arguments():
    a = lab.parse_args([])
    assert a.steps == list(lab.STEPS) and a.cap_gib == 48 and a.layers == 80 and a.tokens == 512
    assert lab.parse_args(["--steps", "paging,kernels"]).steps == ["kernels", "paging"]  # lab order
    for bad in (["--steps", "kernels,nope"], ["--steps", ","], ["--cap-gib", "0"], ["--layers", "0"]):
        with pytest.raises(SystemExit) as e:
            lab.parse_args(bad)
        assert e.value.code == 2


def test_run_step_records_failures_and_the_schema():
    ok = lab.run_step("kernels", lambda: {"x": 1})
    bad = lab.run_step("paging", lambda: 1 / 0)
    skipped = lab.run_step("vs_bnb", lambda: {"status": "skipped", "reason": "r"})
    assert ok["status"] == "ok" and ok["x"] == 1 and isinstance(ok["seconds"], float)
    assert bad["status"] == "failed" and "ZeroDivisionError" in bad["error"]
    assert skipped["status"] == "skipped"
    result = dict(what="w", date="d", versions={}, device={}, args={},
                  steps={"kernels": ok, "paging": bad, "vs_bnb": skipped})
    assert lab.check_result(result) == []
    broken = dict(result, steps={"nope": ok, "kernels": {"status": "maybe"}})
    del broken["device"]
    problems = lab.check_result(broken)
    assert any("device" in p for p in problems) and any("nope" in p for p in problems)
    assert any("kernels" in p for p in problems)


def test_environment_names_versions():
    env = lab.environment()
    assert {"torch", "transformers", "bitsandbytes", "peft", "cuda"} <= set(env["versions"])
    assert env["date"][:2] == "20"


def test_random_linear4bit_is_a_working_layer():
    layer = lab.random_linear4bit(128, 64, "cpu", torch.Generator().manual_seed(0))
    assert isinstance(layer, Linear4bit) and not any(t.is_meta for t in layer.state_dict().values())
    y = layer(torch.randn(3, 128, dtype=torch.bfloat16))
    assert y.shape == (3, 64) and torch.isfinite(y.float()).all()


def test_paging_step_needs_the_65b_step():
    args = lab.parse_args([])
    assert lab.step_paging(args, {})["status"] == "skipped"
