"""tools/avx2_cpu.c, the CPU that `make test-avx2` presents: with it preloaded, torch, oneDNN,
bitsandbytes and the compiler see no AVX-512, a real crash still crashes, and bitsandbytes takes its
other CPU path, whose FP4 "minus zero" is -0.0 like ours (its AVX-512 path writes +0.0)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def preload(tmp_path_factory):
    """The environment of `make test-avx2` (the library built here, as the Makefile builds it)."""
    lib = tmp_path_factory.mktemp("avx2") / "avx2_cpu.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-Wall", "-o", str(lib),
                    str(ROOT / "tools" / "avx2_cpu.c"), "-ldl"], check=True)
    env = {**os.environ, "LD_PRELOAD": str(lib), "ATEN_CPU_CAPABILITY": "avx2",
           "ONEDNN_MAX_CPU_ISA": "AVX2"}
    probe = subprocess.run(["true"], env=env, capture_output=True, text=True)
    if "no CPUID faulting" in probe.stderr:
        pytest.skip("this CPU or kernel has no CPUID faulting: the CPU cannot be presented as AVX2")
    return env


def run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_nothing_sees_avx512(preload):
    out = run("import torch, qlora_mini, bitsandbytes.functional as F; "
              "print(torch.backends.cpu.get_cpu_capability(), F.lib.has_avx512f_cpu(), "
              "torch.ops.mkldnn._is_mkldnn_bf16_supported())", preload)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["AVX2", "0", "False"]
    macros = subprocess.run(["gcc", "-march=native", "-dM", "-E", "-x", "c", "/dev/null"],
                            env=preload, capture_output=True, text=True, check=True).stdout
    assert "__AVX2__" in macros and "__AVX512F__" not in macros


def test_a_real_crash_still_crashes(preload):
    """The SIGSEGV handler passes every fault that is not a CPUID on: with Python's faulthandler
    on (as under pytest) the traceback is printed and the process dies of SIGSEGV."""
    out = run("import faulthandler, ctypes; faulthandler.enable(); ctypes.string_at(0)", preload)
    assert out.returncode == -11 and "Fatal Python error: Segmentation fault" in out.stderr


def test_bitsandbytes_other_cpu_path_writes_minus_zero(preload):
    """FP4 code 8 ("minus zero"): bitsandbytes' AVX2/scalar CPU path gives -0.0, as our codebook
    and its CUDA kernel do; its AVX-512 path gives +0.0 (tests/test_kernels.py)."""
    code = ("import torch, qlora_mini, bitsandbytes.functional as F\n"
            "p, s = F.quantize_4bit(torch.randn(4, 64), blocksize=64, quant_type='fp4')\n"
            "w = F.dequantize_4bit(torch.full_like(p, 0x88), s)   # every code 8\n"
            "print(F.lib.has_avx512f_cpu(), bool((w == 0).all()), bool(torch.signbit(w).all()))")
    out = run(code, preload)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "True", "True"]
