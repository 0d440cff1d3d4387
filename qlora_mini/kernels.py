"""The dequantization kernels: build, query, call (hand-written plumbing, not generated).

Chapter 4 explains the kernel; this module only builds and calls it. One per-element program
(``csrc/dequant_4bit_core.h``), two back ends:

- CUDA (``csrc/dequant_4bit.cu`` + its torch binding ``csrc/dequant_4bit_binding.cpp``): on a
  machine with a CUDA device, compiled just in time by ``torch.utils.cpp_extension.load`` on first
  use (cached in torch's extension directory; needs ``ninja`` and ``nvcc``).
- CPU (``csrc/dequant_4bit_cpu.cpp`` + its torch binding ``csrc/dequant_4bit_cpu_binding.cpp``):
  the twin, built the same way with g++ (``-O3 -march=native``, OpenMP over blocks) on first use.
  The binding checks the tensors, allocates the output and runs the kernel in one call from
  Python: on a 1024x1024 weight, checks in Python would cost half as much again as the kernel.

:func:`dequantize_4bit` is chapter 3's ``storage.dequantize_4bit`` with these paths: it sends CUDA
tensors to :func:`dequantize_4bit_cuda` and CPU tensors to :func:`dequantize_4bit_cpu`, and calls
the PyTorch reference where a kernel does not apply or did not build (that build warns once).
Chapter 5's layer calls it by name; :func:`dequantize_path` and :func:`active_path` say which code
runs. Storage never imports this module: the arrows run one way, chapter 4 → chapter 3.

The developer tools that need no GPU (nvcc compile checks, PTX, the CUDA kernel's per-thread
program on the host, the binding's syntax, the CPU kernel alone through ctypes) live in
:mod:`qlora_mini.kernel_build`.
"""
from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

from qlora_mini import storage
from qlora_mini.storage import FLOAT_DTYPES, QuantState4bit, check_state
from qlora_mini.utils import ceil_div, default_device

CSRC = Path(__file__).resolve().parent / "csrc"  # the package's C++/CUDA sources (chapters 4, 7)
KERNEL_SRC = CSRC / "dequant_4bit.cu"           # the kernel: no torch headers
BINDING_SRC = CSRC / "dequant_4bit_binding.cpp"  # the torch side
HEADER_SRC = CSRC / "dequant_4bit.h"             # the plain-C interface between them
CORE_SRC = CSRC / "dequant_4bit_core.h"          # the per-element program both back ends share
CPU_SRC = CSRC / "dequant_4bit_cpu.cpp"          # the CPU twin: no torch headers
CPU_BINDING_SRC = CSRC / "dequant_4bit_cpu_binding.cpp"  # its torch side
TORCH_ARGS_SRC = CSRC / "dequant_4bit_torch.h"  # tensors -> QmDequantArgs, for both bindings
CPU_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]  # no FMA: bit-exactness


def cpu_cflags() -> list[str]:
    """CPU_CFLAGS for this process. Where torch dispatches below AVX-512 on an x86 CPU (a CPU
    without it, or ATEN_CPU_CAPABILITY=avx2 capping one with it), the twin is built without
    AVX-512 too (-mno-avx512f): the portable loop, as on a student's AVX2 laptop."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    capped = x86 and torch.backends.cpu.get_cpu_capability() != "AVX512"
    return CPU_CFLAGS + (["-mno-avx512f"] if capped else [])

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
    sources = (KERNEL_SRC, HEADER_SRC, CORE_SRC, BINDING_SRC, CPU_SRC, CPU_BINDING_SRC, TORCH_ARGS_SRC)
    data = b"".join(p.read_bytes() for p in sources)
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
    """Which code :func:`dequantize_4bit` runs for tensors on ``device`` ("cuda" or "cpu";
    default: utils.default_device()), in words, with the reason when it is the reference. The
    first call per device builds its kernel."""
    device = torch.device(device if device is not None else default_device()).type
    if device == "cpu":
        if _build_cpu() is None:
            return f"PyTorch reference (CPU kernel {_cpu_error})"
        return f"cpu kernel ({_cpu_ext.isa()}, OpenMP)"
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
# The CPU twin and its torch binding

_cpu_ext = None     # the built extension (a Python module)
_cpu_error = None   # why there is none (a string), once we tried


def _build_cpu():
    """Build (or load from torch's extension cache) the CPU twin once; warn once on failure. The
    name carries a hash of the sources, the flags (cpu_cflags) and this CPU's model (-march=native)."""
    global _cpu_ext, _cpu_error
    if _cpu_ext is not None or _cpu_error is not None:
        return _cpu_ext
    if os.environ.get("QLORA_MINI_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no"):
        _cpu_error = "disabled by QLORA_MINI_CPU_KERNEL=0"
        return None
    try:
        from torch.utils.cpp_extension import load
        flags = cpu_cflags()
        tag = _sources_hash(*flags, platform.machine(), _cpu_model())
        _cpu_ext = load(name=f"qlora_mini_dequant_4bit_cpu_ext_{tag}",
                        sources=[str(CPU_BINDING_SRC), str(CPU_SRC)], extra_include_paths=[str(CSRC)],
                        extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001  (any build failure means: use the PyTorch reference)
        _cpu_error = _build_failed("CPU", e)
    return _cpu_ext


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
    if _build_cpu() is None:
        raise RuntimeError(f"the qlora_mini CPU kernel is unavailable: {_cpu_error}")
    try:                                                     # the binding checks every tensor
        return _cpu_ext.dequantize_4bit(packed, state.code, state.absmax, state.nested_absmax,
                                        state.nested_code, state.offset, state.blocksize,
                                        state.nested_blocksize, state.shape,
                                        dtype or state.dtype, out)
    except Exception:
        _explain_cpu_refusal(packed, state, dtype, out)
        raise                                                # good arguments: a real failure


def _explain_cpu_refusal(packed, state, dtype, out) -> None:
    """Raise, in words, the error the binding found (it reports only which check failed):
    chapter 3's check_state (sizes, dtypes, devices, codebooks), then the device and the output."""
    check_state(packed, state)
    if packed.is_cuda:
        raise ValueError("dequantize_4bit_cpu takes CPU tensors")
    _out_buffer(state, dtype, packed.device, out)


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
    packed = torch.empty(ceil_div(x.numel(), 2), dtype=torch.uint8)
    absmax = torch.empty(ceil_div(x.numel(), blocksize), dtype=torch.float32)
    _cpu_ext.quantize_blocks(x, blocksize, cuts, order8, packed, absmax)
    return packed, absmax


# ---------------------------------------------------------------------------------------------
# The dispatcher chapter 5 calls: a compiled path where one applies, chapter 3's reference elsewhere


def dequantize_path(packed: torch.Tensor) -> str:
    """The code :func:`dequantize_4bit` runs for ``packed``'s device: "cuda kernel", "cpu kernel"
    or "PyTorch reference" (the first call per device builds its kernel)."""
    if isinstance(packed, torch.Tensor) and packed.is_cuda and available():
        return "cuda kernel"
    if isinstance(packed, torch.Tensor) and packed.is_cpu and cpu_available():
        return "cpu kernel"
    return "PyTorch reference"


def dequantize_4bit(packed: torch.Tensor, state: QuantState4bit, dtype=None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Chapter 3's :func:`qlora_mini.storage.dequantize_4bit`, the same bits, by the compiled
    kernel for CUDA tensors and its twin for CPU tensors, by the reference elsewhere (another
    device, a kernel that did not build). Returns ``state.shape`` in ``dtype`` (default
    ``state.dtype``), written into ``out`` if given."""
    path = dequantize_path(packed)
    if path == "cuda kernel":
        return dequantize_4bit_cuda(packed, state, dtype, out)
    if path == "cpu kernel":
        return dequantize_4bit_cpu(packed, state, dtype, out)
    W = storage.dequantize_4bit(packed, state, dtype)              # checks every argument
    return W if out is None else _out_buffer(state, dtype, packed.device, out).copy_(W)
