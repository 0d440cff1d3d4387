"""Small helpers every chapter uses (hand-written plumbing, not generated from a notebook).

They import nothing from the package, so any chapter module may import them without making a loop.
"""
from __future__ import annotations

import os
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
