"""Small helpers every chapter uses (hand-written plumbing, not generated from a notebook).

They import nothing from the package, so any chapter module may import them without making a loop.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable


# PCIe 4.0 x16, bytes/s in each direction, from the PCI-SIG specification: 16 GT/s on each of 16
# lanes with 128b/130b encoding (chapter 7 derives it the same way). A specification, not a
# measurement: a real copy gets less.
PCIE4_X16_BYTES_PER_S = 16e9 * 16 * 128 / 130 / 8

# Vendor datasheet numbers for the GPUs the book's rooflines use (dense, no sparsity): memory
# bandwidth in bytes/s, bf16 tensor-core FLOP/s, the host link (PCIe) and NVLink in bytes/s in
# each direction (None: no chapter uses it, or the card has no such link). One table, so that
# chapters 4, 5, 10 and 11 cannot disagree; these are specifications, not measurements.
# NVLink: the datasheets give both directions together, halved here: H100 SXM "NVLink: 900GB/s";
# RTX A6000 "NVLink Interconnect: 112.5 GB/s (bidirectional)" (two cards and a bridge). The RTX
# A6000 datasheet names its host link "PCI Express 4.0 x16".
GPU_DATASHEETS = {
    "H100 SXM": {"hbm_bytes_per_s": 3.35e12, "bf16_flops_per_s": 989e12,
                 "pcie_bytes_per_s": None, "nvlink_bytes_per_s": 900e9 / 2},
    "A100-80GB": {"hbm_bytes_per_s": 2.04e12, "bf16_flops_per_s": None,
                  "pcie_bytes_per_s": None, "nvlink_bytes_per_s": None},
    "RTX 4090": {"hbm_bytes_per_s": 1.01e12, "bf16_flops_per_s": None,
                 "pcie_bytes_per_s": None, "nvlink_bytes_per_s": None},
    "RTX A6000": {"hbm_bytes_per_s": 0.77e12, "bf16_flops_per_s": 154.8e12,
                  "pcie_bytes_per_s": PCIE4_X16_BYTES_PER_S, "nvlink_bytes_per_s": 112.5e9 / 2},
}

# An assumption, not a measurement or a datasheet number: the device memory the CUDA context (the
# driver's state, the loaded kernels, the libraries' handles) takes outside PyTorch's caching
# allocator. Chapters 10 and 11 subtract their bills from a card with it in mind; chapter 10's lab
# records the real figure on a GPU (outside_allocator_bytes, after each of its steps).
CUDA_CONTEXT_BYTES_ASSUMED = 0.5e9


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for non-negative integers, exactly (no float): blocks of ``b`` that hold ``a``."""
    return -(-a // b)


def cache_dir() -> Path:
    """Where the book keeps what it builds or converts once (models): $QLORA_MINI_CACHE, else
    ~/.cache/qlora_mini."""
    return Path(os.environ.get("QLORA_MINI_CACHE") or Path.home() / ".cache" / "qlora_mini")


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on ``path`` for the duration, so that a second process (a test beside a
    notebook, say) waits for the first one's build instead of making a second copy. A no-op where
    fcntl does not exist."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def file_sha256(path) -> str:
    """The sha256 of a file, read 1 MiB at a time: how checkpoints, weights and downloaded
    files are named and checked."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def writable_folder(folder) -> Path:
    """Make ``folder`` (and its parents) if needed and check that a file can be created in it,
    before a command starts work it would lose at its first write; else an OSError naming it."""
    import tempfile
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OSError(f"{folder}: cannot write results there ({e.strerror or e})") from None
    return folder


def default_device() -> str:
    """Where work runs when the caller does not say: "cuda" where PyTorch sees a GPU, else "cpu"."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16(device="cpu") -> bool:
    """True where a bfloat16 matmul runs at full speed on ``device``. On CUDA: the GPU supports
    bf16 (Ampere and later). On a CPU: oneDNN has bf16 kernels for it (AVX512-BF16, AMX, or
    AVX-512's emulation) and torch dispatches at AVX-512 (not capped by ATEN_CPU_CAPABILITY or
    ONEDNN_MAX_CPU_ISA). Elsewhere, on AVX2-only x86 CPUs (GitHub's runners, most laptops) and
    other CPUs, a bf16 matmul is tens of times slower than fp32 (chapter 6 measures it)."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN, or without this query
        onednn = False
    return onednn and torch.backends.cpu.get_cpu_capability() == "AVX512"


_SAID_FP32 = set()  # the devices default_compute_dtype has already explained itself for


def default_compute_dtype(device="cpu"):
    """What ``compute_dtype=None`` means: bfloat16, the paper's, where it is native on ``device``
    (``native_bf16``); else float32, saying so once per device type. A "meta" device counts as
    the CPU."""
    import logging
    import torch
    device = torch.device(device)
    kind = "cpu" if device.type == "meta" else device.type
    if native_bf16(kind):
        return torch.bfloat16
    if kind not in _SAID_FP32:
        _SAID_FP32.add(kind)
        logging.getLogger("qlora_mini").warning(
            "qlora_mini: no native bfloat16 on this %s (torch dispatches at %s): computing in "
            "float32, which is faster here; pass compute_dtype=torch.bfloat16 to insist", kind,
            torch.backends.cpu.get_cpu_capability() if kind == "cpu" else kind)
    return torch.float32


def add_to_class(cls: type) -> Callable:
    """Decorator that adds the function below it to ``cls`` as a method (d2l's ``add_to_class``).

    A notebook grows a class over several cells; this says so where it happens:

        @add_to_class(Linear4bit)
        def _apply(self, fn, recurse=True): ...

    It takes a ``property`` too (stacked under it), named after its getter.
    """
    def register(fn: Callable) -> Callable:
        setattr(cls, fn.fget.__name__ if isinstance(fn, property) else fn.__name__, fn)
        return fn
    return register


def in_ci() -> bool:
    """True when running under continuous integration (``CI`` set to anything but ''/0/false/no).

    GitHub Actions sets ``CI=true``; other systems set ``CI=1``. Checks that may be skipped on a
    reader's machine (a missing ``nvcc``) must fail instead in CI.
    """
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_dir(final: Path, write) -> None:
    """Write a directory atomically: `write(tmp)` fills a temporary sibling, which is fsynced and
    renamed onto `final` with os.replace, so a reader never sees a half-written `final`. An
    exception in `write` removes the temporary folder; a kill leaves at worst a stale `.tmp-*`
    folder (ignored, cleaned by the next write). When `final`
    already exists, the old copy is first moved aside: between those two renames only the `.old-*`
    copy exists. (Chapter 8's checkpoints reuse this.)"""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for path in [*tmp.rglob("*"), tmp]:  # data on disk before the rename makes it visible
        _fsync(path)
    if final.exists():  # os.replace cannot overwrite a non-empty directory: move the old aside
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)
