"""Checks for the book's exercises (hand-written plumbing, not generated from a notebook).

Every exercise in the book has a label, ``ex-CC-N`` (chapter CC, exercise N), a difficulty tag, a
starter cell, and a check: a function that takes the student's function or value, compares it with
the package's reference (on fresh random inputs where the answer is a function), prints
``ex-CC-N: pass`` or the first case that fails, and raises :class:`ExerciseFailed` (an
``AssertionError``) on a failure. The same call therefore grades a notebook cell, a pytest test, an
nbgrader autograded cell or an otter-grader test::

    from qlora_mini.exercises import check
    check("ex-09-1", my_elo_update)

The check functions live beside each chapter's code (``qlora_mini.<chapter>_checks``, generated
from the chapter's notebook); :data:`CHECKS` names them. This module imports none of them until a
check runs, so it comes before every chapter.
"""
from __future__ import annotations

import importlib

import numpy as np


class ExerciseFailed(AssertionError):
    """A student's answer differs from the reference; the message names the first failing case."""


def _fail(label: str, message: str):
    print(f"{label}: FAIL\n{message}")
    raise ExerciseFailed(f"{label}: {message}")


def compare(label: str, student_fn, reference_fn, cases, close) -> None:
    """Call student_fn(*args) and reference_fn(*args) for each args in cases; fail on the first
    where close(got, want) is false or the student's function raises."""
    cases = list(cases)
    for i, args in enumerate(cases):
        want = reference_fn(*args)
        try:
            got = student_fn(*args)
        except Exception as e:  # a check reports a failure; it does not crash the grader
            _fail(label, f"case {i}: {_short(args)}\n  raised {type(e).__name__}: {e}")
        ok = False
        try:
            ok = bool(close(got, want))
        except Exception:   # a wrong type or shape is a wrong answer
            pass
        if not ok:
            _fail(label, f"case {i}: {_short(args)}\n  expected {_short(want)}\n"
                         f"  got      {_short(got)}")
    print(f"{label}: pass ({len(cases)} cases)")


def _short(x, limit: int = 300) -> str:
    """A one-line repr, cut at `limit` characters; a transformers config as its non-default keys."""
    if isinstance(x, tuple):
        return "(" + ", ".join(_short(a, limit) for a in x) + ")"
    if hasattr(x, "to_diff_dict"):
        keys = {k: v for k, v in x.to_diff_dict().items() if k != "transformers_version"}
        text = f"{type(x).__name__}({', '.join(f'{k}={v!r}' for k, v in keys.items())})"
    else:
        text = repr(x)
    return text if len(text) <= limit else text[:limit] + " ..."


def close_arrays(atol: float = 0.0, rtol: float = 0.0):
    """A `close` for compare(): same shape, every element within atol + rtol * |want|."""
    def close(got, want):
        g, w = np.asarray(got, float), np.asarray(want, float)
        return g.shape == w.shape and np.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
    return close


CHECKS = {  # label -> "module:function"; each function takes the student's answer (and options)
    "ex-01-1": "qlora_mini.quantization_checks:check_zero_fraction",
    "ex-01-2": "qlora_mini.quantization_checks:check_absmax_bits",
    "ex-01-3": "qlora_mini.quantization_checks:check_lloyd_max",
    "ex-01-4": "qlora_mini.quantization_checks:check_eq4_normal",
    "ex-02-1": "qlora_mini.codebooks_checks:check_symmetric_nf4",
    "ex-02-2": "qlora_mini.codebooks_checks:check_mse_ratio",
    "ex-02-3": "qlora_mini.codebooks_checks:check_ieee_e2m1",
    "ex-02-4": "qlora_mini.codebooks_checks:check_fraction_non_normal",
    "ex-03-1": "qlora_mini.storage_checks:check_storage_bytes",
    "ex-03-2": "qlora_mini.storage_checks:check_constant_bits",
    "ex-03-3": "qlora_mini.storage_checks:check_absmax_error",
    "ex-03-4": "qlora_mini.storage_checks:check_column_major",
    "ex-04-1": "qlora_mini.cuda_kernel_checks:check_min_bytes",
    "ex-04-2": "qlora_mini.cuda_kernel_checks:check_blocks_per_thread",
    "ex-04-3": "qlora_mini.cuda_kernel_checks:check_count_instructions",
    "ex-04-4": "qlora_mini.cuda_kernel_checks:check_bytes_in_flight",
    "ex-04-5": "qlora_mini.cuda_kernel_checks:check_portable_twin",
    "ex-05-1": "qlora_mini.linear4bit_checks:check_layer_bytes",
    "ex-05-2": "qlora_mini.linear4bit_checks:check_saving_matmul",
    "ex-05-3": "qlora_mini.linear4bit_checks:check_crossing",
    "ex-05-4": "qlora_mini.linear4bit_checks:check_dropout_bytes",
    "ex-05-5": "qlora_mini.linear4bit_checks:check_gpt2_mlp",
    "ex-06-1": "qlora_mini.lora_checks:check_equal_rank",
    "ex-06-2": "qlora_mini.lora_checks:check_lora_grads",
    "ex-06-3": "qlora_mini.lora_checks:check_adapter_bytes",
    "ex-06-4": "qlora_mini.lora_checks:check_rounded_away",
    "ex-07-1": "qlora_mini.paged_checks:check_activation_bytes",
    "ex-07-2": "qlora_mini.paged_checks:check_logprobs_and_inputs",
    "ex-07-3": "qlora_mini.paged_checks:check_bnb_adamw",
    "ex-08-1": "qlora_mini.train_checks:check_tokenize",
    "ex-08-2": "qlora_mini.train_checks:check_same_adapter",
    "ex-08-3": "qlora_mini.train_checks:check_accumulated_loss",
    "ex-09-1": "qlora_mini.elo_checks:check_elo_update",
    "ex-09-2": "qlora_mini.elo_checks:check_win_rate_matrix",
    "ex-09-3": "qlora_mini.elo_checks:check_spread",
    "ex-09-4": "qlora_mini.elo_checks:check_bradley_terry",
    "ex-10-1": "qlora_mini.lab_checks:check_longest",
    "ex-10-2": "qlora_mini.lab_checks:check_over_bound",
    "ex-10-3": "qlora_mini.lab_checks:check_roofline_floor",
    "ex-11-1": "qlora_mini.distributed_checks:check_codes_per_card",
    "ex-11-2": "qlora_mini.distributed_checks:check_prefetch_saving",
    "ex-11-3": "qlora_mini.distributed_checks:check_no_reshard",
    "ex-12-1": "qlora_mini.datatypes_checks:check_cell",
    "ex-12-2": "qlora_mini.datatypes_checks:check_weight_mse",
    "ex-12-3": "qlora_mini.datatypes_checks:check_e1m2",
    "ex-13-1": "qlora_mini.finetuning_checks:check_interval",
    "ex-13-2": "qlora_mini.finetuning_checks:check_lora_bytes",
    "ex-13-3": "qlora_mini.finetuning_checks:check_equal_rank",
}


def check(label: str, answer, **options) -> None:
    """Run exercise `label`'s check on the student's answer (a function or a value)."""
    if label not in CHECKS:
        raise KeyError(f"no exercise {label!r}; known: {', '.join(sorted(CHECKS))}")
    module, name = CHECKS[label].split(":")
    getattr(importlib.import_module(module), name)(answer, **options)


def labels() -> list[str]:
    return sorted(CHECKS)
