"""The dequantization kernels built outside torch, for the checks that need no GPU (hand-written
developer tools, not generated).

Chapter 4, ``tests/test_kernels.py`` and ``bench/dequant.py`` use them on any machine with
``nvcc`` (and ``g++``):

- :func:`compile_check` compiles ``csrc/dequant_4bit.cu`` alone to cubins for several GPU
  architectures and reports registers and spills; :func:`ptx_summary` counts what the PTX promises
  (16-byte accesses, no FMA, no local memory).
- :func:`dequantize_4bit_host` runs the CUDA kernel's own per-thread program on the CPU (nvcc's
  host build, one "thread" after another), so the GPU kernel's indexing is testable without a GPU.
- :func:`binding_syntax_check` type-checks the torch binding with ``g++ -fsyntax-only``.
- :func:`build_cpu_library` builds the CPU kernel alone (no torch binding; other flags, e.g.
  without AVX-512) and :func:`dequantize_4bit_raw` calls it through ctypes: the portable inner
  loop's test, and the benchmark's "kernel alone" contestant.
"""
from __future__ import annotations

import ctypes
import math
import os
import platform
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from qlora_mini.kernels import (BINDING_SRC, CPU_SRC, CSRC, KERNEL_SRC, _cache_dir, cpu_cflags,
                                _cpu_model, _out_buffer, _sources_hash)
from qlora_mini.storage import QuantState4bit, check_state

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")     # A100, RTX 30xx/A6000, RTX 40xx/L40S, H100


class CompileError(RuntimeError):
    """nvcc is missing or failed; the message carries the command and nvcc's output."""


def find_nvcc() -> str | None:
    """Path of ``nvcc``: on PATH, else under $CUDA_HOME (or $CUDA_PATH, /usr/local/cuda); or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def _nvcc(args: list[str]) -> subprocess.CompletedProcess:
    nvcc = find_nvcc()
    if nvcc is None:
        raise CompileError("nvcc not found (looked on PATH, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda)")
    proc = subprocess.run([nvcc, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"{' '.join([nvcc, *args])} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def _compile_one(arch: str, outdir: Path) -> dict:
    """nvcc -cubin for one architecture; ptxas' report gives registers and spills per kernel."""
    if not re.fullmatch(r"sm_\d+", arch):
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    cubin = outdir / f"dequant_4bit.{arch}.cubin"
    start = time.perf_counter()
    proc = _nvcc(["-cubin", f"-arch={arch}", "-O3", "-Xptxas", "-v", "-o", str(cubin), str(KERNEL_SRC)])
    seconds = time.perf_counter() - start
    report = proc.stdout + proc.stderr
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", report)]
    return dict(arch=arch, cubin=str(cubin), cubin_bytes=cubin.stat().st_size, kernels=len(regs),
                max_registers=max(regs, default=0), spill_bytes=max(spills, default=0),
                seconds=seconds)


def compile_check(arch_list=ARCHS, outdir=None) -> list[dict]:
    """Compile the kernel file alone with nvcc to a cubin for each architecture (in parallel).

    Returns one record per arch: cubin path and size, number of kernels, the most registers a
    kernel uses, spilled bytes, compile seconds. Raises :class:`CompileError` if nvcc is missing
    or fails. Needs no GPU and no CUDA build of torch.
    """
    outdir = Path(outdir) if outdir is not None else _cache_dir() / "compile_check"
    outdir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, min(len(arch_list), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda a: _compile_one(a, outdir), arch_list))


def ptx_summary(arch: str = "sm_90", outdir=None) -> dict:
    """Compile the kernel to PTX and count what the chapter promises: 16-byte loads
    (``ld.global.nc.v4``) and stores (``st.global.v4``), no fused multiply-add (``fma``) and no
    local-memory arrays (``.local``)."""
    outdir = Path(outdir) if outdir is not None else _cache_dir() / "compile_check"
    outdir.mkdir(parents=True, exist_ok=True)
    ptx = outdir / f"dequant_4bit.{arch}.ptx"
    _nvcc(["-ptx", f"-arch={arch}", "-O3", "-o", str(ptx), str(KERNEL_SRC)])
    text = ptx.read_text()
    count = lambda pattern: len(re.findall(pattern, text))  # noqa: E731
    return dict(arch=arch, ptx=str(ptx), kernels=count(r"\.entry "), wide_loads=count(r"ld\.global\.nc\.v4\."),
                wide_stores=count(r"st\.global\.v4\."), fma=count(r"\bfma\."),
                mul_rn=count(r"\bmul\.rn\.f32"), add_rn=count(r"\badd\.rn\.f32"), local=count(r"\.local\b"))


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include folder ($CUDA_HOME, $CUDA_PATH, /usr/local/cuda, next to nvcc)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if find_nvcc():
        roots.append(str(Path(find_nvcc()).resolve().parents[1]))
    for root in roots:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return Path(root) / "include"
    return None


def binding_syntax_check() -> None:
    """Compile the CUDA torch binding on the host with ``g++ -fsyntax-only`` (torch's, Python's and
    CUDA's headers): nothing else exercises it without a GPU. Raises :class:`CompileError`. A pass
    is remembered (a stamp named by the hash of the sources, torch's version and the compiler)."""
    import sysconfig
    import tempfile

    from torch.utils.cpp_extension import include_paths
    cxx, cuda_inc = shutil.which(os.environ.get("CXX", "g++")), cuda_include_dir()
    if cxx is None or cuda_inc is None:
        raise CompileError(f"needs g++ ({cxx}) and the CUDA headers ({cuda_inc})")
    stamp = _cache_dir() / f"binding_syntax_ok_{_sources_hash(torch.__version__, cxx, str(cuda_inc))}"
    if stamp.exists():
        return
    with tempfile.TemporaryDirectory() as stub:
        # A CPU-only torch wheel lacks the one generated c10/cuda config header: an empty stand-in
        # (searched last, so a CUDA build's real header wins).
        (Path(stub) / "c10" / "cuda" / "impl").mkdir(parents=True)
        (Path(stub) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
        incs = [f"-I{p}" for p in [*include_paths("cpu"), sysconfig.get_paths()["include"],
                                   str(cuda_inc), str(CSRC)]]
        cmd = [cxx, "-fsyntax-only", "-std=c++17", "-DTORCH_EXTENSION_NAME=qlora_mini_check",
               *incs, "-idirafter", stub, str(BINDING_SRC)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.touch()


# ---------------------------------------------------------------------------------------------
# The kernels alone, through ctypes: the plain-C QmDequantArgs of csrc/dequant_4bit.h

OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # QmOutDtype


class _Args(ctypes.Structure):
    """ctypes mirror of QmDequantArgs in csrc/dequant_4bit.h (same order, same types)."""
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("packed", "code", "absmax", "absmax_q", "nested_absmax", "nested_code", "offset", "out")]
    _fields_ += [("n", ctypes.c_int64), ("log2_blocksize", ctypes.c_int),
                 ("log2_nested_blocksize", ctypes.c_int), ("out_dtype", ctypes.c_int)]


def _c_args(packed, state: QuantState4bit, out: torch.Tensor) -> tuple[_Args, list]:
    """QmDequantArgs for CPU tensors, and the contiguous tensors it points into (keep them alive).
    Chapter 3's check_state checks sizes, dtypes and devices; here only that they are the CPU's."""
    check_state(packed, state)
    if not packed.is_cpu:
        raise TypeError(f"packed and its state must be CPU tensors, got {packed.device}")
    dq = state.double_quant                              # absmax: fp32 values or uint8 indices
    tables = ((state.code, state.nested_code, state.nested_absmax, state.offset) if dq
              else (state.code,))
    keep = [t.contiguous() for t in (packed, state.absmax, *tables)]
    p = [t.data_ptr() for t in keep]
    tail = (out.data_ptr(), math.prod(state.shape), state.blocksize.bit_length() - 1,
            state.nested_blocksize.bit_length() - 1, OUT_DTYPES[out.dtype])
    if dq:                         # packed, code, absmax (fp32), absmax_q, nested, offset, out, ...
        return _Args(p[0], p[2], None, p[1], p[4], p[3], p[5], *tail), keep
    return _Args(p[0], p[2], p[1], None, None, None, None, *tail), keep


def build_cpu_library(extra_cflags=()) -> ctypes.CDLL:
    """JIT-build csrc/dequant_4bit_cpu.cpp alone, without the torch binding, with
    torch.utils.cpp_extension.load (cached under a name hashing the sources, flags and CPU)."""
    from torch.utils.cpp_extension import load
    flags = [*cpu_cflags(), *extra_cflags]
    tag = _sources_hash(*flags, platform.machine(), _cpu_model())
    path = load(name=f"qlora_mini_dequant_4bit_cpu_{tag}", sources=[str(CPU_SRC)],
                extra_include_paths=[str(CSRC)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                is_python_module=False, verbose=False)
    lib = ctypes.CDLL(path)
    lib.qlora_mini_dequantize_4bit_cpu.restype = ctypes.c_char_p
    lib.qlora_mini_dequantize_4bit_cpu.argtypes = [ctypes.POINTER(_Args), ctypes.c_int,
                                                   ctypes.c_int]     # args, threads, fresh_out
    lib.qlora_mini_dequantize_4bit_cpu_isa.restype = ctypes.c_char_p
    return lib


def dequantize_4bit_raw(packed, state: QuantState4bit, dtype, out: torch.Tensor, lib) -> torch.Tensor:
    """The CPU kernel of ``lib`` (from :func:`build_cpu_library`) into ``out``, through ctypes."""
    check_state(packed, state)
    a, keep = _c_args(packed, state, _out_buffer(state, dtype, packed.device, out))
    err = lib.qlora_mini_dequantize_4bit_cpu(ctypes.byref(a), torch.get_num_threads(), 0)
    if err:
        raise RuntimeError(err.decode())
    return out


_host_lib = None


def _host_library() -> ctypes.CDLL:
    """Compile csrc/dequant_4bit.cu into a host shared library once (cached by source hash)."""
    global _host_lib
    if _host_lib is None:
        lib = _cache_dir() / f"dequant_4bit_host_{_sources_hash()}.so"
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            _nvcc(["-shared", "-Xcompiler", "-fPIC,-ffp-contract=off", "-O2", "-arch=sm_80",
                   "-o", str(tmp), str(KERNEL_SRC)])
            tmp.replace(lib)
        _host_lib = ctypes.CDLL(str(lib))
        _host_lib.qlora_mini_dequantize_4bit_host.restype = ctypes.c_char_p
    return _host_lib


def dequantize_4bit_host(packed: torch.Tensor, state: QuantState4bit, dtype=None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Run the CUDA kernel's per-thread code (``dequant_chunk``) on the CPU for CPU tensors: the
    .cu source compiled by nvcc for the host. A test of the GPU kernel's indexing, not of the GPU
    (whose bf16/fp16 conversions and fp32 multiplies are also IEEE round-to-nearest-even)."""
    check_state(packed, state)
    if packed.is_cuda:
        raise ValueError("dequantize_4bit_host takes CPU tensors")
    out = _out_buffer(state, dtype, packed.device, out)
    a, keep = _c_args(packed, state, out)
    err = _host_library().qlora_mini_dequantize_4bit_host(ctypes.byref(a))
    if err:
        raise RuntimeError(err.decode())
    return out
