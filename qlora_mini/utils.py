"""Small helpers every chapter uses (hand-written plumbing, not generated from a notebook).

They import nothing from the package, so any chapter module may import them without making a loop.
"""
from __future__ import annotations

import os
from typing import Callable


# Vendor datasheet numbers for the GPUs the book's rooflines use (dense, no sparsity): memory
# bandwidth in bytes/s and bf16 tensor-core FLOP/s (None: no chapter uses it). One table, so that
# chapters 4, 5 and 10 cannot disagree; these are specifications, not measurements.
GPU_DATASHEETS = {
    "H100 SXM": {"hbm_bytes_per_s": 3.35e12, "bf16_flops_per_s": 989e12},
    "A100-80GB": {"hbm_bytes_per_s": 2.04e12, "bf16_flops_per_s": None},
    "RTX 4090": {"hbm_bytes_per_s": 1.01e12, "bf16_flops_per_s": None},
    "RTX A6000": {"hbm_bytes_per_s": 0.77e12, "bf16_flops_per_s": 154.8e12},
}


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
