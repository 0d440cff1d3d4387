"""Tests for qlora_mini.kernels and csrc/dequant_4bit* (chapter 4): the CUDA kernel and its CPU twin.

(a) Compile checks (nvcc; g++ -fsyntax-only for the torch binding): in CI (utils.in_ci()) a
    missing compiler or a failed compile FAILS the test, outside CI a missing compiler skips it.
(b) The CPU twin (csrc/dequant_4bit_cpu.cpp, g++): bit-exact against the PyTorch reference, an
    independent decode by hand (numpy), and bitsandbytes; in CI a failed build fails.
(c) GPU tests: skipped with "no CUDA device" where torch.cuda is unavailable; bit-exact against
    the PyTorch reference and against bitsandbytes on fresh random inputs, output buffers poisoned
    with NaN first.
(d) CPU tests of the dispatcher (kernels.dequantize_4bit, dequantize_path) and the queries.
Bit-exact means equal bit patterns (int views), so -0.0 vs +0.0 and NaN payloads count.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch

import qlora_mini  # noqa: F401  (silences bitsandbytes' log line)
import bitsandbytes.functional as F
from qlora_mini import kernel_build, kernels
from qlora_mini.storage import _dequantize_4bit_torch, from_bnb, quantize_4bit, to_bnb
from qlora_mini.utils import in_ci

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
no_cuda = not torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(no_cuda, reason="no CUDA device")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_matches_bnb(got: torch.Tensor, want: torch.Tensor, quant_type: str):
    """Equal to bitsandbytes' CPU dequantization: bit for bit for NF4 (no signed zero to differ
    in); for FP4 equal in value, element for element (NaN-free), the only bit differences allowed
    being signed zeros: bitsandbytes' two CPU paths differ there (its AVX-512 table writes +0.0 for
    FP4's code 8, "minus zero", where its AVX2/scalar path and its CUDA kernel write -0.0). Our own
    bits are pinned against decode_by_hand."""
    if quant_type == "nf4":
        assert_bit_exact(got, want)
        return
    assert got.shape == want.shape and got.dtype == want.dtype
    assert not torch.isnan(got).any() and torch.equal(got, want), quant_type
    differ = bits(got) != bits(want)
    assert (got[differ] == 0).all(), "bits differ beyond the sign of zero"


def assert_bit_exact(got: torch.Tensor, want: torch.Tensor, case=""):
    assert got.shape == want.shape and got.dtype == want.dtype, case
    assert not torch.isnan(got).any(), f"{case}: an output element was not written (NaN poison survived)"
    differ = bits(got) != bits(want)
    mismatch = differ.sum().item()
    zeros = (got[differ] == want[differ]).sum().item()   # +0.0 vs -0.0: equal values, other bits
    assert mismatch == 0, (f"{case}: {mismatch} of {got.numel()} elements differ in their bits "
                           f"({zeros} only in the sign of zero)")


def require_nvcc():
    """In CI the compile checks must run: a missing nvcc is a failure there, a skip elsewhere."""
    if kernel_build.find_nvcc() is None:
        if in_ci():
            pytest.fail("running in CI but nvcc was not found: the CUDA kernel must compile in CI")
        pytest.skip("nvcc not found (outside CI the nvcc compile checks are optional)")


def require_cpu_kernel():
    """The CPU twin must build in CI; elsewhere (no compiler) the PyTorch reference is the path."""
    if not kernels.cpu_available():
        if in_ci():
            pytest.fail(f"running in CI but the CPU kernel did not build: {kernels._cpu_error}")
        pytest.skip(f"CPU kernel unavailable here: {kernels._cpu_error}")


def fresh(shape, seed, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device) * (1 + seed % 3)


def decode_by_hand(packed, state, dtype):
    """Dequantize in numpy, from the stored fields alone (no qlora_mini code): float32 products
    with numpy's IEEE rounding, then one rounding to dtype (numpy for float16, torch for bfloat16,
    which numpy lacks)."""
    n, bs = state.numel, state.blocksize
    p = packed.reshape(-1).numpy()
    idx = np.stack([p >> 4, p & 15], axis=1).reshape(-1)[:n]             # (n,) element order
    absmax = state.absmax.numpy()
    if state.nested_absmax is not None:                                    # double quantization
        scale = np.repeat(state.nested_absmax.numpy(), state.nested_blocksize)[:absmax.size]
        absmax = state.nested_code.numpy()[absmax] * scale                 # float32 * float32
        absmax = absmax + np.float32(state.offset.item())                  # float32 + float32
    values = state.code.numpy()[idx] * np.repeat(absmax, bs)[:n]          # (n,) float32
    assert values.dtype == np.float32
    if dtype == torch.float16:
        with np.errstate(over="ignore"):                                  # overflow -> inf
            return torch.from_numpy(values.astype(np.float16)).view(state.shape)
    return torch.from_numpy(values).to(dtype).view(state.shape)


# ------------------------------------------------------------------ (a) compile checks (nvcc)

def test_compile_check_all_archs(tmp_path):
    require_nvcc()
    records = kernel_build.compile_check(kernel_build.ARCHS, tmp_path)   # CompileError fails the test
    assert [r["arch"] for r in records] == ["sm_80", "sm_86", "sm_89", "sm_90"]
    for r in records:
        assert r["cubin_bytes"] > 0 and r["kernels"] == 6, r      # 3 dtypes x (DQ, no DQ)
        assert r["spill_bytes"] == 0, r


def test_ptx_has_wide_accesses_and_no_fma(tmp_path):
    require_nvcc()
    s = kernel_build.ptx_summary("sm_90", tmp_path)
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
            assert_bit_exact(kernel_build.dequantize_4bit_host(packed, state, dtype, out=out), want)
            buf = torch.full((want.numel() + 1,), float("nan"), dtype=dtype)
            shifted = buf[1:].view(shape)                         # 2 or 4 bytes off 16-byte alignment
            assert_bit_exact(kernel_build.dequantize_4bit_host(packed, state, dtype, out=shifted), want)


def test_host_emulation_matches_bitsandbytes():
    """Same, against bitsandbytes' CPU dequantize (rows a multiple of 64: see bnb's AVX-512 bug).
    Equal values (assert_matches_bnb): bits may differ only in signed zeros, where bnb's AVX-512
    table has +0.0 for FP4's code 8 ("minus zero"; -0.0 in our codebook and bnb's CUDA kernel)."""
    require_nvcc()
    import bitsandbytes.functional as F
    for quant_type in ("nf4", "fp4"):
        for dq in (True, False):
            packed, state = quantize_4bit(fresh((8, 512), 7), 64, quant_type, dq)
            for dtype in DTYPES:
                p, qs = to_bnb(packed, state)
                qs.dtype = dtype
                got, want = kernel_build.dequantize_4bit_host(packed, state, dtype), F.dequantize_4bit(p, qs)
                assert_matches_bnb(got, want, quant_type)


def test_torch_binding_compiles_on_host():
    """The CUDA kernel's torch binding, type-checked by g++ against torch's headers (no GPU)."""
    if kernel_build.cuda_include_dir() is None or __import__("shutil").which("g++") is None:
        if in_ci():
            pytest.fail("running in CI but g++ or the CUDA headers are missing")
        pytest.skip("g++ or the CUDA headers are missing")
    kernel_build.binding_syntax_check()                              # CompileError fails the test


# ------------------------------------------------------------------ (b) the CPU twin

CPU_CASES = [((1,), 64), ((33,), 32), ((3, 1001), 64), ((64, 300), 64), ((5, 4097), 4096),
             ((7, 129), 128), ((130, 96), 32), ((600, 256), 64)]   # 2400 blocks: > 256 nested


def test_cpu_kernel_builds_and_is_the_cpu_path():
    require_cpu_kernel()
    assert kernels.active_path("cpu").startswith("cpu kernel (")
    packed, state = quantize_4bit(fresh((8, 64), 0), 64, "nf4", True)
    assert kernels.dequantize_path(packed) == "cpu kernel"


@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cpu_twin_bit_exact_vs_reference_and_by_hand(quant_type, dq):
    """Odd and ragged sizes, several blocksizes, > 256 blocks, every output dtype, into NaN-poisoned
    outputs, 16-byte aligned and not."""
    require_cpu_kernel()
    for i, (shape, blocksize) in enumerate(CPU_CASES):
        packed, state = quantize_4bit(fresh(shape, i), blocksize, quant_type, dq)
        for dtype in DTYPES:
            case = f"{shape} blocksize={blocksize} {quant_type} dq={dq} -> {dtype}"
            want = decode_by_hand(packed, state, dtype)
            assert_bit_exact(_dequantize_4bit_torch(packed, state, dtype), want, case)
            out = torch.full(shape, float("nan"), dtype=dtype)
            assert_bit_exact(kernels.dequantize_4bit_cpu(packed, state, dtype, out=out), want, case)
            buf = torch.full((want.numel() + 1,), float("nan"), dtype=dtype)
            shifted = buf[1:].view(shape)                         # 2 or 4 bytes off alignment
            assert_bit_exact(kernels.dequantize_4bit_cpu(packed, state, dtype, out=shifted), want, case)


def test_cpu_twin_large_fresh_output_is_bit_exact():
    """An output of 8 MiB and more that the binding allocates is mapped in before it is written
    (MADV_POPULATE_WRITE, one run per thread): the same values as the reference, every dtype."""
    require_cpu_kernel()
    packed, state = quantize_4bit(fresh((2048, 1100), 5), 64, "fp4", True)   # 9 MB in fp32
    for dtype in DTYPES:
        want = _dequantize_4bit_torch(packed, state, dtype)
        assert_bit_exact(kernels.dequantize_4bit(packed, state, dtype), want)


def test_cpu_twin_reads_strided_views():
    """Packed codes and constants that are views with strides (as slices of larger tensors) give
    the same values as their dense copies."""
    require_cpu_kernel()
    packed, state = quantize_4bit(fresh((6, 200), 4), 64, "nf4", True)
    wide = torch.stack([packed, packed ^ 0xFF], dim=1)[:, 0]             # stride 2
    assert not wide.is_contiguous()
    codes = torch.stack([state.code, -state.code], dim=1)[:, 0]
    strided = replace(state, code=codes, absmax=torch.stack([state.absmax] * 2, 1)[:, 1])
    for dtype in DTYPES:
        want = _dequantize_4bit_torch(packed, state, dtype)
        assert_bit_exact(kernels.dequantize_4bit(wide, strided, dtype), want)


def test_cpu_twin_without_avx512_is_bit_exact_too():
    """The portable inner loop (the scalar per-element function, for CPUs without AVX-512),
    built with -mno-avx512f, on ragged sizes and every dtype."""
    require_cpu_kernel()
    if __import__("platform").machine() not in ("x86_64", "AMD64"):
        pytest.skip("-mno-avx512f is an x86 flag")
    lib = kernel_build.build_cpu_library(["-mno-avx512f"])
    assert lib.qlora_mini_dequantize_4bit_cpu_isa() == b"scalar"
    for i, (shape, blocksize) in enumerate(CPU_CASES[:6]):
        for quant_type, dq in (("nf4", True), ("fp4", False)):
            packed, state = quantize_4bit(fresh(shape, 20 + i), blocksize, quant_type, dq)
            for dtype in DTYPES:
                out = torch.full(shape, float("nan"), dtype=dtype)
                got = kernel_build.dequantize_4bit_raw(packed, state, dtype, out, lib)
                assert_bit_exact(got, decode_by_hand(packed, state, dtype), f"{shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_twin_rounds_like_numpy_and_torch_over_the_float_range(dtype):
    """Every index is 15 (NF4's 1.0), so each output is its block's absmax rounded to dtype; the
    absmax are random float32 bit patterns with magnitudes 2^-40 to 2^40 (float16 subnormals,
    normals, overflow to inf), a third of them exact ties for bfloat16 and a third for float16."""
    require_cpu_kernel()
    g = torch.Generator().manual_seed(1)
    packed, state = quantize_4bit(fresh((3000, 32), 2), 32, "nf4", False)
    packed.fill_(0xFF)
    n = state.n_blocks
    exponent = torch.randint(127 - 40, 127 + 40, (n,), generator=g)
    mantissa = torch.randint(0, 1 << 23, (n,), generator=g)
    mantissa[0::3] = (mantissa[0::3] & ~0xFFFF) | 0x8000           # halfway between two bf16
    mantissa[1::3] = (mantissa[1::3] & ~0x1FFF) | 0x1000           # halfway between two fp16
    sign = torch.randint(0, 2, (n,), generator=g) << 31
    state.absmax = (sign | (exponent << 23) | mantissa).int().view(torch.float32)
    want = decode_by_hand(packed, state, dtype)
    assert torch.equal(want.float().abs().amax(dim=1), want.float().abs()[:, 0])  # = absmax
    assert_bit_exact(kernels.dequantize_4bit_cpu(packed, state, dtype), want)
    assert_bit_exact(_dequantize_4bit_torch(packed, state, dtype), want)


@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cpu_twin_matches_bitsandbytes(quant_type, dq):
    """What bitsandbytes quantized, the twin dequantizes to bitsandbytes' values. Where bnb's
    AVX-512 CPU kernel is right (rows a multiple of the blocksize) against its output, in value
    (assert_matches_bnb: its CPU paths differ in the sign of FP4's zero); everywhere, our bits
    against bnb's state decoded by hand."""
    require_cpu_kernel()
    for i, (shape, blocksize) in enumerate([((16, 512), 64), ((6, 256), 128), ((3, 1001), 64),
                                            ((9, 40), 64), ((1, 77), 32)]):
        bpacked, bstate = F.quantize_4bit(fresh(shape, 10 + i), blocksize=blocksize,
                                          quant_type=quant_type, compress_statistics=dq)
        packed, state = from_bnb(bpacked, bstate)
        for dtype in DTYPES:
            got = kernels.dequantize_4bit_cpu(packed, state, dtype)
            assert_bit_exact(got, decode_by_hand(packed, state, dtype))
            if shape[-1] % blocksize:
                continue                                         # bnb's AVX-512 CPU bug
            bstate.dtype = dtype
            want = F.dequantize_4bit(bpacked, bstate)
            assert_matches_bnb(got, want, quant_type)


def test_cpu_twin_refuses_what_it_cannot_read():
    require_cpu_kernel()
    packed, state = quantize_4bit(fresh((4, 64), 0), 64, "nf4", True)
    with pytest.raises(ValueError, match="out must be"):
        kernels.dequantize_4bit_cpu(packed, state, torch.bfloat16, out=torch.empty(4, 64))
    with pytest.raises(TypeError, match="dtype"):
        kernels.dequantize_4bit_cpu(packed, state, torch.int8)
    with pytest.raises(TypeError, match="state.code"):
        state.code = state.code.double()
        kernels.dequantize_4bit_cpu(packed, state)


def test_fallback_to_the_reference_without_the_cpu_kernel(monkeypatch):
    packed, state = quantize_4bit(fresh((5, 100), 3), 64, "fp4", True)
    monkeypatch.setattr(kernels, "_cpu_ext", None)
    monkeypatch.setattr(kernels, "_cpu_error", "build failed: (simulated)")
    assert kernels.dequantize_path(packed) == "PyTorch reference"
    assert kernels.active_path("cpu") == "PyTorch reference (CPU kernel build failed: (simulated))"
    for dtype in DTYPES:
        want = decode_by_hand(packed, state, dtype)
        assert_bit_exact(kernels.dequantize_4bit(packed, state, dtype), want)
        out = torch.full((5, 100), float("nan"), dtype=dtype)
        assert kernels.dequantize_4bit(packed, state, dtype, out=out) is out
        assert_bit_exact(out, want)
    with pytest.raises(ValueError, match="out must be"):
        kernels.dequantize_4bit(packed, state, torch.bfloat16, out=torch.empty(5, 100))


def test_failed_cpu_build_warns_once(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension: c++ not found (simulated)")
    monkeypatch.setattr(cpp, "load", broken)
    monkeypatch.setattr(kernels, "_cpu_ext", None)
    monkeypatch.setattr(kernels, "_cpu_error", None)
    monkeypatch.delenv("QLORA_MINI_CPU_KERNEL", raising=False)
    with pytest.warns(RuntimeWarning, match="CPU dequantization kernel did not build"):
        assert kernels.cpu_available() is False
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # a second warning would raise
        assert kernels.cpu_available() is False
    assert "simulated" in kernels.active_path("cpu")


# ------------------------------------------------------------------ (c) on a GPU

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
        assert_bit_exact(kernels.dequantize_4bit(packed, state, dtype), want)   # the dispatcher
    assert kernels.dequantize_path(packed) == "cuda kernel"


# ------------------------------------------------------------------ (d) CPU: dispatch and queries

@pytest.mark.skipif(not no_cuda, reason="checks the no-CUDA fallback")
def test_no_cuda_reports_reference_path():
    assert kernels.available() is False
    assert kernels.active_path("cuda") == "PyTorch reference (no CUDA device)"
    assert kernels.active_path() == kernels.active_path("cpu")   # the default: this machine's


def test_cuda_entry_refuses_cpu_tensors():
    packed, state = quantize_4bit(fresh((4, 64), 0), 64, "nf4", True)
    with pytest.raises(ValueError, match="CUDA tensor"):
        kernels.dequantize_4bit_cuda(packed, state, torch.bfloat16)


def test_storage_does_not_import_kernels():
    """Chapter 3 must not depend on chapter 4: chapter 4's dispatcher calls storage's reference,
    never the other way round."""
    import ast
    import inspect

    import qlora_mini.storage as storage
    tree = ast.parse(inspect.getsource(storage))
    names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in n.names} | {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("kernels" in name for name in names), names


@pytest.mark.parametrize("compiled", [True, False], ids=["cpu kernel", "reference"])
def test_dispatcher_names_bad_arguments(compiled, monkeypatch):
    """kernels.dequantize_4bit refuses bad arguments in chapter 3's words on either path: the
    binding's refusal is explained by check_state, the reference checks first."""
    if compiled:
        require_cpu_kernel()
    else:
        monkeypatch.setattr(kernels, "_cpu_ext", None)
        monkeypatch.setattr(kernels, "_cpu_error", "build failed: (simulated)")
    packed, state = quantize_4bit(fresh((4, 64), 0), 64, "nf4", True)
    assert kernels.dequantize_path(packed) == ("cpu kernel" if compiled else "PyTorch reference")
    with pytest.raises(ValueError, match="packed: 127 entries.*need 128"):
        kernels.dequantize_4bit(packed[:-1], state)
    with pytest.raises(TypeError, match="state must be a QuantState4bit"):
        kernels.dequantize_4bit(packed, None)
    with pytest.raises(TypeError, match="dtype must be"):
        kernels.dequantize_4bit(packed, state, torch.int8)
    with pytest.raises(TypeError, match="packed must be a uint8 tensor"):
        kernels.dequantize_4bit(packed.tolist(), state)


def test_dispatcher_sends_other_devices_to_the_reference():
    assert kernels.dequantize_path(torch.empty(8, dtype=torch.uint8, device="meta")) == \
        "PyTorch reference"


def test_find_nvcc_via_cuda_home(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert kernel_build.find_nvcc() == str(fake)


def test_compile_check_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="arch"):
        kernel_build.compile_check(["90"], tmp_path)
    monkeypatch.setattr(kernel_build, "find_nvcc", lambda: None)
    with pytest.raises(kernel_build.CompileError, match="nvcc not found"):
        kernel_build.compile_check(["sm_90"], tmp_path)


def test_out_buffer_is_checked():
    packed, state = quantize_4bit(fresh((4, 64), 0), 64, "nf4", True)
    with pytest.raises(ValueError, match="out must be"):
        kernel_build.dequantize_4bit_host(packed, state, torch.bfloat16, out=torch.empty(4, 64))
    with pytest.raises(TypeError, match="dtype"):
        kernel_build.dequantize_4bit_host(packed, state, torch.int8)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cpu_quantize_twin_gives_chapter3_bytes_and_bitsandbytes(quant_type):
    """kernels.quantize_blocks_cpu against chapter 3's PyTorch steps (blockwise_absmax,
    round_to_code, pack_nibbles): the same packed bytes and absmax for ragged and odd lengths, every
    bitsandbytes blocksize, zero blocks, tiny and exactly-on-a-cut values, 16-bit inputs; and,
    whole, the same bytes as bitsandbytes' quantize_4bit."""
    require_cpu_kernel()
    from qlora_mini.codebooks import get_code
    from qlora_mini.quantization import round_to_code
    from qlora_mini.storage import blockwise_absmax, pack_nibbles
    code = get_code(quant_type)
    levels = code.sort().values
    for i, (n, blocksize) in enumerate([(1, 32), (63, 64), (4096, 64), (1001, 64), (777, 256),
                                        (5000, 4096), (70_000, 128)]):
        x = fresh(n, 20 + i)
        x[: n // 4] *= 1e-30                                     # tiny values, subnormal ratios
        x[n // 2: n // 2 + blocksize] = 0                        # a zero block (if it fits)
        x[-3:] = ((levels[:-1] + levels[1:]) / 2)[:3][: min(3, n)] * x.abs().max()  # near cuts
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xf = x.to(dtype).float()
            scaled, absmax = blockwise_absmax(xf, blocksize)
            scaled = torch.nn.functional.pad(scaled, (0, n % 2))
            want = pack_nibbles(round_to_code(scaled, code)), absmax
            got = kernels.quantize_blocks_cpu(xf, blocksize, code)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (n, blocksize, dtype)
    W = fresh((16, 512), 30)
    bpacked, bstate = F.quantize_4bit(W, blocksize=64, quant_type=quant_type)
    packed, absmax = kernels.quantize_blocks_cpu(W.reshape(-1), 64, code)
    assert torch.equal(packed, bpacked.reshape(-1)) and torch.equal(absmax, bstate.absmax)
    with pytest.raises(TypeError, match="1-D float32 CPU tensor"):
        kernels.quantize_blocks_cpu(W, 64, code)
