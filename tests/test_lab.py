"""Chapter 10's GPU lab (bench/lab.py), its CPU side: arguments, the refusal without CUDA, the
result schema, the runner catching a failing step; and the package's random QLoRA models
(qlora_mini.random_qlora) that the lab and bench/layer65b.py build on."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qlora_mini  # noqa: F401
from qlora_mini.linear4bit import Linear4bit
from qlora_mini.lora import LoRALinear
from qlora_mini.random_qlora import random_linear4bit, random_qlora_model
from qlora_mini.storage import storage_nbytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lab():
    spec = importlib.util.spec_from_file_location("bench_lab", ROOT / "bench" / "lab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_without_cuda_in_one_line(lab, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lab.main([]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [lab.NO_CUDA] and "CUDA" in lab.NO_CUDA
    assert captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.processes
def test_script_exits_2_from_anywhere(lab, tmp_path):
    """Run as a reader runs it, from another folder: exit status 2, one line, no file."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "lab.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == lab.NO_CUDA
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


def test_the_lab_is_not_in_the_package():
    assert importlib.util.find_spec("qlora_mini.lab") is None


def test_arguments(lab):
    args = lab.parse_args([])
    assert args.steps == list(lab.STEPS) and args.cap_gib == 48 and args.layers == 80
    assert args.tokens == 512 and args.out is None
    assert lab.parse_args(["--steps", "paging,kernels"]).steps == ["kernels", "paging"]  # lab order
    for bad in (["--steps", "kernels,nope"], ["--steps", ","], ["--cap-gib", "0"], ["--layers", "0"],
                ["--tokens", "1"], ["--cap-gib", "nan"], ["--cap-gib", "inf"], ["--cap-gib=-1"],
                ["--layers=-3"], ["--tokens=-1"]):
        with pytest.raises(SystemExit) as e:
            lab.parse_args(bad)
        assert e.value.code == 2


@pytest.mark.parametrize("make_out", [lambda tmp: tmp / "missing" / "lab.json", lambda tmp: tmp,
                                      lambda tmp: Path("/proc/lab.json"),
                                      lambda tmp: Path("/dev/null")])
def test_an_unwritable_out_is_refused_before_cuda_is_asked(lab, tmp_path, capsys, make_out):
    """The --out check comes first: on this CPU machine it is what refuses, not the CUDA check."""
    out = make_out(tmp_path)
    assert lab.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {out}:")
    assert lab.out_problem(tmp_path / "lab.json") is None and list(tmp_path.iterdir()) == []


def test_main_writes_the_file_after_every_step(lab, tmp_path, monkeypatch, capsys):
    """With a (pretend) GPU, each step finds the earlier steps already on disk."""
    out = tmp_path / "lab.json"
    seen = []

    def look(args):
        seen.append(json.loads(out.read_text()))
        return {}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (0, 0))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(lab, "environment", lambda: dict(date="2026-01-01", versions={},
                                                         device=dict(name="Pretend GPU")))
    monkeypatch.setattr(lab, "STEP_FUNCTIONS", dict(kernels=look, gpu_tests=look,
                                                    dequant_bench=look))
    assert lab.main(["--steps", "kernels,gpu_tests,dequant_bench", "--out", str(out)]) == 0
    assert [list(r["steps"]) for r in seen] == [[], ["kernels"], ["kernels", "gpu_tests"]]
    assert [r["pending"] for r in seen] == [["kernels", "gpu_tests", "dequant_bench"],
                                            ["gpu_tests", "dequant_bench"], ["dequant_bench"]]
    final = json.loads(out.read_text())
    assert lab.check_result(final) == [] and "pending" not in final
    assert list(final["steps"]) == ["kernels", "gpu_tests", "dequant_bench"]
    assert [p.name for p in tmp_path.iterdir()] == ["lab.json"]
    assert f"wrote {out}" in capsys.readouterr().out


def test_every_step_has_a_function(lab):
    assert set(lab.STEP_FUNCTIONS) == set(lab.STEPS)
    assert set(lab.SHARING_A_MODEL) < set(lab.STEPS)


def test_run_step_records_failures_and_the_schema(lab):
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


def test_subprocess_steps_run_in_the_checkout(lab):
    """A step's command runs at the checkout's root, whatever the current folder: its exit status
    decides ok or failed, and the output's tail is kept."""
    ok = lab.run_in_checkout([sys.executable, "-c", "import os; print(os.getcwd())"], timeout=60)
    assert ok["status"] == "ok" and Path(ok["output_tail"].strip()) == ROOT
    failed = lab.run_in_checkout([sys.executable, "-c", "raise SystemExit(3)"], timeout=60)
    assert failed["status"] == "failed" and failed["returncode"] == 3
    assert (ROOT / "bench" / "dequant.py").is_file() and (ROOT / "tests" / "test_kernels.py").is_file()


def test_environment_names_versions(lab):
    env = lab.environment()
    assert {"torch", "transformers", "bitsandbytes", "peft", "cuda"} <= set(env["versions"])
    assert env["date"][:2] == "20"


def test_paging_step_needs_the_65b_step(lab):
    assert lab.step_paging(lab.parse_args([]), {})["status"] == "skipped"


def test_random_linear4bit_is_a_working_layer():
    layer = random_linear4bit(128, 64, "cpu", torch.Generator().manual_seed(0))
    assert isinstance(layer, Linear4bit) and not any(t.is_meta for t in layer.state_dict().values())
    stored = sum(t.nbytes for t in (layer.packed, layer.absmax, layer.nested_absmax, layer.offset))
    assert stored == storage_nbytes(128 * 64)              # chapter 3's count, made independently
    y = layer(torch.randn(3, 128, dtype=torch.bfloat16))   # (3, 64)
    assert y.shape == (3, 64) and torch.isfinite(y.float()).all()
    again = random_linear4bit(128, 64, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(layer.packed, again.packed)         # the generator decides every value


def test_random_qlora_model_is_a_qlora_model_with_the_reference_policy():
    """A tiny LLaMA size takes a training step; the 4-bit layers, LoRA and dtypes are in place."""
    model = random_qlora_model("7B", layers=1, r=4, device="cpu")
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 7 and all(isinstance(m.base, Linear4bit) for m in adapted)
    assert {m.lora_A.weight.dtype for m in adapted} == {torch.bfloat16}
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 32000, (1, 4))                   # (1, 4) token ids
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
