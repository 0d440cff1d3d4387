"""The plumbing helpers: ceil_div against math.ceil on exact fractions, add_to_class, in_ci, and
the default compute dtype (bfloat16 only where it is native)."""
from fractions import Fraction
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from qlora_mini import utils
from qlora_mini.utils import add_to_class, ceil_div, in_ci


def test_ceil_div_matches_exact_ceiling():
    for a in [0, 1, 2, 63, 64, 65, 10**18 + 1]:
        for b in [1, 2, 3, 64, 256]:
            assert ceil_div(a, b) == math.ceil(Fraction(a, b))


def test_add_to_class_adds_a_method():
    class C:
        pass

    @add_to_class(C)
    def twice(self, x):
        return 2 * x

    assert C().twice(3) == 6 and C.twice is twice


def test_add_to_class_adds_a_property():
    class C:
        def __init__(self):
            self.x = 5

    @add_to_class(C)
    @property
    def doubled(self):
        return 2 * self.x

    assert C().doubled == 10 and isinstance(C.__dict__["doubled"], property)


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("TRUE", True),
                                             ("", False), ("0", False), ("false", False)])
def test_in_ci(monkeypatch, value, expected):
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_not_in_ci_when_unset(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert in_ci() is False


def test_gpu_datasheet_numbers_live_in_one_place():
    """Every chapter's roofline reads qlora_mini.utils.GPU_DATASHEETS: no notebook's or module's
    source types one of its numbers again (outputs are not searched)."""
    import json
    import re
    from pathlib import Path

    from qlora_mini.utils import GPU_DATASHEETS
    root = Path(__file__).resolve().parents[1]
    values = {v for d in GPU_DATASHEETS.values() for v in d.values() if v}
    spellings = {f"{v:g}" for v in values} | {f"{v / 1e12:g}e12" for v in values}
    pattern = re.compile(r"(?<![\d.])(" + "|".join(re.escape(s) for s in spellings) + r")(?![\d])")
    sources = {p: p.read_text() for p in (root / "qlora_mini").glob("*.py") if p.name != "utils.py"}
    for nb in (root / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        sources[nb] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    found = {str(p.relative_to(root)): pattern.findall(text) for p, text in sources.items()}
    assert not {p: f for p, f in found.items() if f}
    assert pattern.findall("peak = 989e12") and pattern.findall("bw = 3.35e12")  # it can fail


@pytest.fixture
def cpu_as(monkeypatch):
    """Pretend torch dispatches at `capability` with oneDNN's bf16 query answering `onednn`."""
    def pretend(capability: str, onednn: bool):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn,
                            raising=False)
        monkeypatch.setattr(utils, "_SAID_FP32", set())
    return pretend


@pytest.mark.parametrize("capability, onednn, native", [("AVX512", True, True),
                                                         ("AVX512", False, False),
                                                         ("AVX2", True, False),
                                                         ("DEFAULT", False, False)])
def test_native_bf16_needs_avx512_dispatch_and_onednn(cpu_as, capability, onednn, native):
    cpu_as(capability, onednn)
    assert utils.native_bf16("cpu") is native
    assert utils.default_compute_dtype("cpu") == (torch.bfloat16 if native else torch.float32)


def test_fp32_default_says_so_once(cpu_as, caplog):
    cpu_as("AVX2", False)
    with caplog.at_level(logging.WARNING, logger="qlora_mini"):
        assert utils.default_compute_dtype("cpu") == torch.float32
        assert utils.default_compute_dtype("meta") == torch.float32   # meta counts as the CPU
    said = [r.getMessage() for r in caplog.records if r.name == "qlora_mini"]
    assert len(said) == 1 and "no native bfloat16" in said[0] and "AVX2" in said[0]


def test_defaults_follow_the_cpu(cpu_as, tmp_path):
    """Every default that used to compute in bf16: Linear4bit, quantize_model, prepare_qlora,
    load_4bit and the training config's "auto" (chapter 8's build_model)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from qlora_mini.config import load_config
    from qlora_mini.linear4bit import Linear4bit, quantize_model
    from qlora_mini.load4bit import load_4bit
    from qlora_mini.lora import prepare_qlora
    from qlora_mini.recipe import build_model
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, vocab_size=128)
                     ).save_pretrained(tmp_path)
    cfg = load_config("default", {"model": str(tmp_path), "compute_dtype": "auto"})
    for capability, onednn, want in [("AVX2", False, torch.float32), ("AVX512", True, torch.bfloat16)]:
        cpu_as(capability, onednn)
        assert Linear4bit(64, 32).compute_dtype == want
        assert Linear4bit.from_linear(nn.Linear(64, 32)).compute_dtype == want
        model = quantize_model(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)), skip=())
        assert {m.compute_dtype for m in model.modules() if isinstance(m, Linear4bit)} == {want}
        model = prepare_qlora(nn.Sequential(nn.Linear(64, 64)), r=4, target_modules=["0"],
                              gradient_checkpointing=False)
        assert model[0].lora_A.weight.dtype == want           # the reference policy: compute dtype
        layers = load_4bit(tmp_path, device="cpu").modules()
        assert {m.compute_dtype for m in layers if isinstance(m, Linear4bit)} == {want}
        layers = build_model(cfg).modules()
        assert {m.compute_dtype for m in layers if isinstance(m, Linear4bit)} == {want}
        assert Linear4bit(64, 32, compute_dtype=torch.float16).compute_dtype == torch.float16


def test_capped_dispatch_is_not_native_bf16():
    """For real, not pretended: with torch's and oneDNN's dispatch capped at AVX2 (as on a CPU
    without AVX-512), bf16 is not native, whatever this machine's CPU."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", "import torch; from qlora_mini.utils import "
                          "native_bf16; print(torch.backends.cpu.get_cpu_capability(), "
                          "native_bf16('cpu'))"], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["AVX2", "False"]


def test_file_lock_excludes_another_process(tmp_path):
    """While one process holds utils.file_lock, another cannot take the same lock (fcntl, checked
    from a second real process); once released, it can."""
    import subprocess
    import sys
    from qlora_mini.utils import file_lock
    path = tmp_path / "x.lock"
    probe = ("import fcntl, sys\nf = open(sys.argv[1], 'w')\n"
             "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    print('got it')\n"
             "except BlockingIOError:\n    print('busy')\n")
    with file_lock(path):
        held = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True,
                              text=True, check=True).stdout.strip()
    free = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert (held, free) == ("busy", "got it")
