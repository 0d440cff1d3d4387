"""Tests for qlora_mini.kernels and csrc/dequant_4bit.cu (chapter 4).

(a) nvcc compile checks: run wherever nvcc is; in CI (env CI set) a missing nvcc or a failed
    compile FAILS the test, outside CI a missing nvcc skips it.
(b) GPU tests: skipped with "no CUDA device" where torch.cuda is unavailable; bit-exact against
    the PyTorch reference and against bitsandbytes on fresh random inputs, output buffers poisoned
    with NaN first.
(c) CPU tests of the dispatch and query logic.
Bit-exact means equal bit patterns (int views), so -0.0 vs +0.0 and NaN payloads count.
"""
import os

import pytest
import torch

from qlora_mini import kernels
from qlora_mini.storage import _dequantize_4bit_torch, dequantize_4bit, quantize_4bit, to_bnb

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
no_cuda = not torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(no_cuda, reason="no CUDA device")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_bit_exact(got: torch.Tensor, want: torch.Tensor):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert not torch.isnan(got).any(), "an output element was not written (NaN poison survived)"
    differ = bits(got) != bits(want)
    mismatch = differ.sum().item()
    zeros = (got[differ] == want[differ]).sum().item()   # +0.0 vs -0.0: equal values, other bits
    assert mismatch == 0, f"{mismatch} of {got.numel()} elements differ in their bits ({zeros} only in the sign of zero)"


def require_nvcc():
    """In CI the compile checks must run: a missing nvcc is a failure there, a skip elsewhere."""
    if kernels.find_nvcc() is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but nvcc was not found: the CUDA kernel must compile in CI")
        pytest.skip("nvcc not found (outside CI the nvcc compile checks are optional)")


def fresh(shape, seed, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device) * (1 + seed % 3)


# ------------------------------------------------------------------ (a) compile checks (nvcc)

def test_compile_check_all_archs(tmp_path):
    require_nvcc()
    records = kernels.compile_check(kernels.ARCHS, tmp_path)   # CompileError fails the test
    assert [r["arch"] for r in records] == ["sm_80", "sm_86", "sm_89", "sm_90"]
    for r in records:
        assert r["cubin_bytes"] > 0 and r["kernels"] == 6, r      # 3 dtypes x (DQ, no DQ)
        assert r["spill_bytes"] == 0, r


def test_ptx_has_wide_accesses_and_no_fma(tmp_path):
    require_nvcc()
    s = kernels.ptx_summary("sm_90", tmp_path)
    assert s["wide_loads"] >= 6 and s["wide_stores"] >= 6, s    # 16-byte loads/stores in every kernel
    assert s["fma"] == 0, s                                     # bit-exactness: no fused multiply-add
    assert s["local"] == 0, s                                   # no local-memory arrays


@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_host_emulation_bit_exact(quant_type, dq):
    """The kernel's per-thread program, compiled by nvcc for the CPU, against the reference:
    odd and ragged sizes, several blocksizes, > 256 blocks (two nested absmax), aligned and
    misaligned (scalar path) outputs, all poisoned with NaN."""
    require_nvcc()
    cases = [((1,), 64), ((33,), 32), ((3, 1001), 64), ((64, 300), 64), ((5, 4097), 4096), ((7, 129), 128)]
    for i, (shape, blocksize) in enumerate(cases):
        packed, state = quantize_4bit(fresh(shape, i), blocksize, quant_type, dq)
        for dtype in DTYPES:
            want = _dequantize_4bit_torch(packed, state, dtype)
            out = torch.full(shape, float("nan"), dtype=dtype)
            assert_bit_exact(kernels.dequantize_4bit_host(packed, state, dtype, out=out), want)
            buf = torch.full((want.numel() + 1,), float("nan"), dtype=dtype)
            shifted = buf[1:].view(shape)                         # 2 or 4 bytes off 16-byte alignment
            assert_bit_exact(kernels.dequantize_4bit_host(packed, state, dtype, out=shifted), want)


def test_host_emulation_matches_bitsandbytes():
    """Same, against bitsandbytes' CPU dequantize (rows a multiple of 64: see bnb's AVX-512 bug).
    NF4: equal bits. FP4: equal values; bits differ only where bnb's CPU table has +0.0 for code 8
    ("minus zero"), which our codebook and bnb's CUDA kernel (lut * -1.0f) give as -0.0."""
    require_nvcc()
    import bitsandbytes.functional as F
    for quant_type in ("nf4", "fp4"):
        for dq in (True, False):
            packed, state = quantize_4bit(fresh((8, 512), 7), 64, quant_type, dq)
            for dtype in DTYPES:
                p, qs = to_bnb(packed, state)
                qs.dtype = dtype
                got, want = kernels.dequantize_4bit_host(packed, state, dtype), F.dequantize_4bit(p, qs)
                if quant_type == "nf4":
                    assert_bit_exact(got, want)
                else:
                    assert torch.equal(got, want)
                    differ = bits(got) != bits(want)
                    assert (got[differ] == 0).all() and torch.signbit(got[differ]).all()


# ------------------------------------------------------------------ (b) on a GPU

GPU_CASES = [((1,), 64), ((33,), 32), ((4097,), 64), ((3, 1001), 64), ((300, 1000), 64),
             ((257, 4111), 128), ((5, 4097), 4096), ((2048, 2048), 64)]


@needs_gpu
def test_kernel_is_active_on_gpu():
    assert kernels.available(), kernels.active_path()
    assert kernels.active_path().startswith("cuda kernel (sm_")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gpu_bit_exact_vs_reference_and_bitsandbytes(quant_type, dq, dtype):
    import bitsandbytes.functional as F
    for i, (shape, blocksize) in enumerate(GPU_CASES):
        packed, state = quantize_4bit(fresh(shape, 100 + i, "cuda"), blocksize, quant_type, dq)
        want = _dequantize_4bit_torch(packed, state, dtype)
        out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
        got = kernels.dequantize_4bit_cuda(packed, state, dtype, out=out)
        assert_bit_exact(got, want)
        p, qs = to_bnb(packed, state)
        qs.dtype = dtype
        assert_bit_exact(got, F.dequantize_4bit(p, qs))


@needs_gpu
def test_gpu_misaligned_output_and_dispatch():
    packed, state = quantize_4bit(fresh((3, 1001), 1, "cuda"), 64, "nf4", True)
    for dtype in DTYPES:
        want = _dequantize_4bit_torch(packed, state, dtype)
        buf = torch.full((want.numel() + 1,), float("nan"), dtype=dtype, device="cuda")
        assert_bit_exact(kernels.dequantize_4bit_cuda(packed, state, dtype, out=buf[1:].view(3, 1001)), want)
        assert_bit_exact(dequantize_4bit(packed, state, dtype), want)   # storage dispatches here


# ------------------------------------------------------------------ (c) CPU: dispatch and queries

@pytest.mark.skipif(not no_cuda, reason="checks the no-CUDA fallback")
def test_cpu_reports_reference_path():
    assert kernels.available() is False
    assert kernels.active_path() == "PyTorch reference (no CUDA device)"


def test_cuda_entry_refuses_cpu_tensors():
    packed, state = quantize_4bit(fresh((4, 64), 0), 64, "nf4", True)
    with pytest.raises(ValueError, match="CUDA tensor"):
        kernels.dequantize_4bit_cuda(packed, state, torch.bfloat16)


def test_storage_on_cpu_uses_reference():
    packed, state = quantize_4bit(fresh((4, 96), 0), 32, "fp4", False)
    for dtype in DTYPES:
        assert_bit_exact(dequantize_4bit(packed, state, dtype), _dequantize_4bit_torch(packed, state, dtype))


def test_find_nvcc_via_cuda_home(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert kernels.find_nvcc() == str(fake)


def test_compile_check_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="arch"):
        kernels.compile_check(["90"], tmp_path)
    monkeypatch.setattr(kernels, "find_nvcc", lambda: None)
    with pytest.raises(kernels.CompileError, match="nvcc not found"):
        kernels.compile_check(["sm_90"], tmp_path)


def test_out_buffer_is_checked():
    packed, state = quantize_4bit(fresh((4, 64), 0), 64, "nf4", True)
    with pytest.raises(ValueError, match="out must be"):
        kernels.dequantize_4bit_host(packed, state, torch.bfloat16, out=torch.empty(4, 64))
    with pytest.raises(TypeError, match="dtype"):
        kernels.dequantize_4bit_host(packed, state, torch.int8)
