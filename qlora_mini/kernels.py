"""The dequantization kernels: build, query, call (hand-written plumbing, not generated).

Chapter 4 explains the kernel; this module only builds and calls it. One per-element program
(``csrc/dequant_4bit_core.h``), two back ends:

- CUDA (``csrc/dequant_4bit.cu`` + its torch binding ``csrc/dequant_4bit_binding.cpp``): on a
  machine with a CUDA device, compiled just in time by ``torch.utils.cpp_extension.load`` on first
  use (cached in torch's extension directory; needs ``ninja`` and ``nvcc``).
- CPU (``csrc/dequant_4bit_cpu.cpp``): the twin, built the same way with g++ (``-O3
  -march=native``, OpenMP over blocks) on first use, called through ctypes.

At import this module registers both with chapter 3 (``storage.register_dequantize_backend``), so
:func:`qlora_mini.storage.dequantize_4bit` sends CUDA tensors to :func:`dequantize_4bit_cuda` and
CPU tensors to :func:`dequantize_4bit_cpu`, falling back to the PyTorch reference (with one
warning) where a build fails. :func:`active_path` says which code runs. Storage never imports
this module: the arrows run one way, chapter 4 → chapter 3.

The checks that need no GPU (nvcc compile checks, PTX, the CUDA kernel's per-thread program on the
host, the binding's syntax) live in :mod:`qlora_mini.kernel_checks`.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import warnings
from pathlib import Path

import torch

from qlora_mini.storage import FLOAT_DTYPES, QuantState4bit, check_state, register_dequantize_backend

CSRC = Path(__file__).resolve().parent / "csrc"
KERNEL_SRC = CSRC / "dequant_4bit.cu"           # the kernel: no torch headers
BINDING_SRC = CSRC / "dequant_4bit_binding.cpp"  # the torch side
HEADER_SRC = CSRC / "dequant_4bit.h"             # the plain-C interface between them
CORE_SRC = CSRC / "dequant_4bit_core.h"          # the per-element program both back ends share
CPU_SRC = CSRC / "dequant_4bit_cpu.cpp"          # the CPU twin: no torch headers
CPU_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]  # no FMA: bit-exactness
OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # QmOutDtype

_ext = None     # the built torch extension
_error = None   # why there is none (a string), once we tried


def _build_failed(device: str, e: Exception) -> str:
    """Warn once, with the full error, that the `device` kernel did not build; return the short
    reason that active_path() reports."""
    warnings.warn(f"qlora_mini: the {device} dequantization kernel did not build, {device} tensors "
                  f"use the PyTorch reference instead.\n{type(e).__name__}: {e}", RuntimeWarning)
    last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
    return f"build failed: {type(e).__name__}: {last}"


def _cache_dir() -> Path:
    from torch.utils.cpp_extension import get_default_build_root
    return Path(get_default_build_root()) / "qlora_mini"


def _sources_hash(*extra: str) -> str:
    data = b"".join(p.read_bytes() for p in (KERNEL_SRC, HEADER_SRC, CORE_SRC, BINDING_SRC, CPU_SRC))
    return hashlib.sha256(data + "|".join(extra).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# The torch extension (needs a CUDA device)


def _build():
    """Build (or load from torch's cache) the extension once; remember the failure reason."""
    global _ext, _error
    if _ext is not None or _error is not None:
        return _ext
    if not torch.cuda.is_available():
        _error = "no CUDA device"
        return None
    try:
        from torch.utils.cpp_extension import load
        _ext = load(name=f"qlora_mini_dequant_4bit_{_sources_hash()}",  # rebuilt on any change
                    sources=[str(BINDING_SRC), str(KERNEL_SRC)],
                    extra_include_paths=[str(CSRC)], extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as e:  # noqa: BLE001  (any build failure means: use the PyTorch reference)
        _error = _build_failed("CUDA", e)
    return _ext


def available() -> bool:
    """True only when a CUDA device is present and the kernel built (first call builds it)."""
    return torch.cuda.is_available() and _build() is not None


def active_path(device=None) -> str:
    """Which code :func:`qlora_mini.storage.dequantize_4bit` runs for tensors on ``device``
    ("cuda" or "cpu"; default: cuda when a CUDA device exists, else cpu), in words. The first
    call per device builds its kernel."""
    device = torch.device(device if device is not None else
                          "cuda" if torch.cuda.is_available() else "cpu").type
    if device == "cpu":
        if _build_cpu() is None:
            return f"PyTorch reference (CPU kernel {_cpu_error})"
        return f"cpu kernel ({_cpu_lib.qlora_mini_dequantize_4bit_cpu_isa().decode()}, OpenMP)"
    if not torch.cuda.is_available():
        return "PyTorch reference (no CUDA device)"
    if _build() is None:
        return f"PyTorch reference (CUDA kernel {_error})"
    major, minor = torch.cuda.get_device_capability()
    return f"cuda kernel (sm_{major}{minor})"


def _out_buffer(state: QuantState4bit, dtype, device, out) -> torch.Tensor:
    dtype = state.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if out is None:
        return torch.empty(state.shape, dtype=dtype, device=device)
    if out.dtype != dtype or out.shape != torch.Size(state.shape) or out.device != device:
        raise ValueError(f"out must be {dtype} of shape {tuple(state.shape)} on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out


def dequantize_4bit_cuda(packed: torch.Tensor, state: QuantState4bit, dtype=None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel: packed (ceil(n/2),) uint8 CUDA tensor + state → ``state.shape`` in ``dtype``
    (default ``state.dtype``), written into ``out`` if given. One launch, also with double quant."""
    check_state(packed, state)
    if not packed.is_cuda:
        raise ValueError(f"packed must be a CUDA tensor, got device {packed.device}")
    ext = _build()
    if ext is None:
        raise RuntimeError(f"the qlora_mini CUDA kernel is unavailable: {_error}")
    out = _out_buffer(state, dtype, packed.device, out)
    ext.dequantize_4bit_out(packed.reshape(-1).contiguous(), state.code, state.absmax,
                            state.nested_absmax, state.nested_code, state.offset,
                            state.blocksize, state.nested_blocksize, out)
    return out


# ---------------------------------------------------------------------------------------------
# The CPU twin, called through ctypes (so is the CUDA kernel's host emulation in kernel_checks)


class _Args(ctypes.Structure):
    """ctypes mirror of QmDequantArgs in csrc/dequant_4bit.h (same order, same types)."""
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("packed", "code", "absmax", "absmax_q", "nested_absmax", "nested_code", "offset", "out")]
    _fields_ += [("n", ctypes.c_int64), ("log2_blocksize", ctypes.c_int),
                 ("log2_nested_blocksize", ctypes.c_int), ("out_dtype", ctypes.c_int)]


def _c_args(packed, state: QuantState4bit, out: torch.Tensor) -> tuple[_Args, list]:
    """QmDequantArgs for CPU tensors, and the contiguous tensors it points into (keep them alive).
    check_state has checked sizes and the absmax dtype; the float32 tables are checked here.
    (Lean on purpose: on a 1024x1024 weight this runs on every call of ~0.1 ms of kernel.)"""
    dq = state.double_quant                              # absmax: fp32 values or uint8 indices
    tables = ((state.code, state.nested_code, state.nested_absmax, state.offset) if dq
              else (state.code,))
    for t in tables:
        if t.dtype != torch.float32 or not t.is_cpu:
            raise TypeError("state.code, .nested_code, .nested_absmax, .offset must be float32 "
                            f"CPU tensors, got {[(t.dtype, t.device.type) for t in tables]}")
    if state.code.numel() != 16 or (dq and state.nested_code.numel() != 256):
        raise ValueError("state.code must hold 16 values and state.nested_code 256")
    keep = [t.contiguous() for t in (packed, state.absmax, *tables)]
    p = [t.data_ptr() for t in keep]
    tail = (out.data_ptr(), math.prod(state.shape), state.blocksize.bit_length() - 1,
            state.nested_blocksize.bit_length() - 1, OUT_DTYPES[out.dtype])
    if dq:                         # packed, code, absmax (fp32), absmax_q, nested, offset, out, ...
        return _Args(p[0], p[2], None, p[1], p[4], p[3], p[5], *tail), keep
    return _Args(p[0], p[2], p[1], None, None, None, None, *tail), keep


_cpu_lib = None     # the built CPU twin (a ctypes library)
_cpu_error = None   # why there is none (a string), once we tried


def _build_cpu():
    """Build (or load from torch's extension cache) the CPU twin once; warn once on failure. The
    name carries a hash of the sources, the flags and this CPU's model (-march=native)."""
    global _cpu_lib, _cpu_error
    if _cpu_lib is not None or _cpu_error is not None:
        return _cpu_lib
    if os.environ.get("QLORA_MINI_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no"):
        _cpu_error = "disabled by QLORA_MINI_CPU_KERNEL=0"
        return None
    try:
        _cpu_lib = build_cpu_library()
    except Exception as e:  # noqa: BLE001  (any build failure means: use the PyTorch reference)
        _cpu_error = _build_failed("CPU", e)
    return _cpu_lib


def build_cpu_library(extra_cflags=()) -> ctypes.CDLL:
    """JIT-build csrc/dequant_4bit_cpu.cpp with torch.utils.cpp_extension.load (ninja, g++; cached
    in torch's extension folder under a name hashing the sources, flags and CPU model)."""
    from torch.utils.cpp_extension import load
    flags = [*CPU_CFLAGS, *extra_cflags]
    tag = _sources_hash(*flags, platform.machine(), _cpu_model())
    path = load(name=f"qlora_mini_dequant_4bit_cpu_{tag}", sources=[str(CPU_SRC)],
                extra_include_paths=[str(CSRC)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                is_python_module=False, verbose=False)
    lib = ctypes.CDLL(path)
    lib.qlora_mini_dequantize_4bit_cpu.restype = ctypes.c_char_p
    lib.qlora_mini_dequantize_4bit_cpu.argtypes = [ctypes.POINTER(_Args), ctypes.c_int]
    lib.qlora_mini_dequantize_4bit_cpu_isa.restype = ctypes.c_char_p
    lib.qlora_mini_quantize_4bit_cpu.restype = ctypes.c_char_p
    lib.qlora_mini_quantize_4bit_cpu.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                                 *[ctypes.c_void_p] * 4, ctypes.c_int]
    return lib


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def cpu_name() -> str:
    """This machine's CPU model and its number of cores, for benchmark records and the book."""
    model = _cpu_model()
    model = model.split(":", 1)[1].strip() if model.startswith("model name") else model
    return f"{model} ({os.cpu_count()} cores)"


def cpu_available() -> bool:
    """True when the CPU twin built (first call builds it: a few seconds, then cached on disk)."""
    return _build_cpu() is not None


def dequantize_4bit_cpu(packed: torch.Tensor, state: QuantState4bit, dtype=None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU twin: packed (ceil(n/2),) uint8 CPU tensor + state → ``state.shape`` in ``dtype``
    (default ``state.dtype``), written into ``out`` if given; torch.get_num_threads() threads."""
    check_state(packed, state)
    if packed.is_cuda:
        raise ValueError("dequantize_4bit_cpu takes CPU tensors")
    if _build_cpu() is None:
        raise RuntimeError(f"the qlora_mini CPU kernel is unavailable: {_cpu_error}")
    out = _out_buffer(state, dtype, packed.device, out)
    return _cpu_backend(packed, state, out.dtype, out)


def _cpu_backend(packed, state, dtype, out=None, lib=None) -> torch.Tensor:
    """The CPU twin on arguments already checked (storage.dequantize_4bit has checked them)."""
    out = torch.empty(state.shape, dtype=dtype) if out is None else out
    a, keep = _c_args(packed, state, out)
    err = (lib or _cpu_lib).qlora_mini_dequantize_4bit_cpu(ctypes.byref(a), torch.get_num_threads())
    if err:
        raise RuntimeError(err.decode())
    return out


def quantize_blocks_cpu(x: torch.Tensor, blocksize: int, code: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first half of chapter 3's quantize_4bit in one compiled pass (for chapter 5's loader):
    x (n,) float32 CPU → (packed (ceil(n/2),) uint8, absmax (ceil(n/blocksize),) float32), the same
    bytes as storage.blockwise_absmax + round_to_code + pack_nibbles (tests/test_kernels.py)."""
    if _build_cpu() is None:
        raise RuntimeError(f"the qlora_mini CPU kernel is unavailable: {_cpu_error}")
    if x.dtype != torch.float32 or x.dim() != 1 or x.is_cuda:
        raise TypeError(f"x must be a 1-D float32 CPU tensor, got {x.dtype} {tuple(x.shape)} {x.device}")
    x = x.contiguous()
    order = torch.argsort(code, stable=True)                     # (16,) sorted position → index
    levels = code[order].float()
    cuts = ((levels[:-1] + levels[1:]) / 2).contiguous()          # (15,) float32, as round_to_code
    order8 = order.to(torch.uint8)
    packed = torch.empty((x.numel() + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-x.numel() // blocksize), dtype=torch.float32)
    err = _cpu_lib.qlora_mini_quantize_4bit_cpu(
        x.data_ptr(), x.numel(), blocksize.bit_length() - 1, cuts.data_ptr(), order8.data_ptr(),
        packed.data_ptr(), absmax.data_ptr(), torch.get_num_threads())
    if err:
        raise RuntimeError(err.decode())
    return packed, absmax


# ---------------------------------------------------------------------------------------------
# Chapter 3's dequantize_4bit dispatches here: registered once, at import (storage never imports us)

register_dequantize_backend("cuda kernel", lambda packed, state, dtype: packed.is_cuda and available(),
                            dequantize_4bit_cuda)
register_dequantize_backend("cpu kernel",
                            lambda packed, state, dtype: packed.is_cpu and cpu_available(),
                            _cpu_backend)
