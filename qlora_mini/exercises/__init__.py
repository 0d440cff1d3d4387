"""The book's exercises (hand-written plumbing, not generated from a notebook).

Every exercise in the book has a label, ``ex-CC-N`` (chapter CC, exercise N), a difficulty tag, a
starter cell, and a check: a function that takes the student's function or value, compares it with
a reference (on fresh random inputs where the answer is a function), prints ``ex-CC-N: pass`` or
the first case that fails, and raises :class:`ExerciseFailed` (an ``AssertionError``) on a failure;
an answer that calls the reference (the grader's function, or the package's function of the same
name) fails too.
The same call therefore grades a notebook cell, a pytest test, an nbgrader autograded cell or an
otter-grader test::

    from qlora_mini.exercises import check
    check("ex-09-1", my_elo_update)

The checks of chapter CC live in one module per chapter, ``qlora_mini.exercises.<chapter>`` (generated
from the chapter's notebook), named for the notebook: ``exercises.storage`` grades chapter 3.
They share :mod:`qlora_mini.exercises.grading`. :func:`checks` imports them, so this file imports
no chapter until a check runs (each chapter's checks import that chapter's code).
"""
from __future__ import annotations

from qlora_mini.exercises.grading import TIME_LIMIT, ExerciseFailed, close_arrays, compare, student_answer

__all__ = ["ExerciseFailed", "check", "checks", "close_arrays", "compare", "labels"]


def checks() -> dict:
    """{label: check function} for every exercise in the book, in chapter order."""
    from qlora_mini.exercises import (  # one module per chapter, in chapter order
        quantization, normalfloat, storage, cuda_kernel, linear4bit, lora, paged_optimizers,
        guanaco, elo, guanaco_65b, fsdp, datatypes, finetuning)
    return {
        "ex-01-1": quantization.check_zero_fraction,
        "ex-01-2": quantization.check_absmax_bits,
        "ex-01-3": quantization.check_lloyd_max,
        "ex-01-4": quantization.check_eq4_normal,
        "ex-02-1": normalfloat.check_symmetric_nf4,
        "ex-02-2": normalfloat.check_mse_ratio,
        "ex-02-3": normalfloat.check_ieee_e2m1,
        "ex-02-4": normalfloat.check_fraction_non_normal,
        "ex-03-1": storage.check_storage_bytes,
        "ex-03-2": storage.check_constant_bits,
        "ex-03-3": storage.check_absmax_error,
        "ex-03-4": storage.check_column_major,
        "ex-04-1": cuda_kernel.check_min_bytes,
        "ex-04-2": cuda_kernel.check_blocks_per_thread,
        "ex-04-3": cuda_kernel.check_count_instructions,
        "ex-04-4": cuda_kernel.check_bytes_in_flight,
        "ex-04-5": cuda_kernel.check_portable_twin,
        "ex-05-1": linear4bit.check_layer_bytes,
        "ex-05-2": linear4bit.check_saving_matmul,
        "ex-05-3": linear4bit.check_crossing,
        "ex-05-4": linear4bit.check_dropout_bytes,
        "ex-05-5": linear4bit.check_gpt2_mlp,
        "ex-06-1": lora.check_equal_rank,
        "ex-06-2": lora.check_lora_grads,
        "ex-06-3": lora.check_adapter_bytes,
        "ex-06-4": lora.check_rounded_away,
        "ex-07-1": paged_optimizers.check_activation_bytes,
        "ex-07-2": paged_optimizers.check_logprobs_and_inputs,
        "ex-07-3": paged_optimizers.check_bnb_adamw,
        "ex-08-1": guanaco.check_tokenize,
        "ex-08-2": guanaco.check_same_adapter,
        "ex-08-3": guanaco.check_accumulated_loss,
        "ex-09-1": elo.check_elo_update,
        "ex-09-2": elo.check_win_rate_matrix,
        "ex-09-3": elo.check_spread,
        "ex-09-4": elo.check_bradley_terry,
        "ex-10-1": guanaco_65b.check_longest,
        "ex-10-2": guanaco_65b.check_over_bound,
        "ex-10-3": guanaco_65b.check_roofline_floor,
        "ex-11-1": fsdp.check_codes_per_card,
        "ex-11-2": fsdp.check_prefetch_saving,
        "ex-11-3": fsdp.check_no_reshard,
        "ex-12-1": datatypes.check_cell,
        "ex-12-2": datatypes.check_weight_mse,
        "ex-12-3": datatypes.check_e1m2,
        "ex-13-1": finetuning.check_interval,
        "ex-13-2": finetuning.check_lora_bytes,
        "ex-13-3": finetuning.check_equal_rank,
    }


def check(label: str, answer, time_limit: float | None = TIME_LIMIT, **options) -> None:
    """Run exercise `label`'s check on the student's answer (a function or a value). A function
    that takes longer than `time_limit` seconds on a case (None: no limit) fails the check."""
    found = checks()
    if label not in found:
        raise KeyError(f"no exercise {label!r}; known: {', '.join(sorted(found))}")
    with student_answer(answer, time_limit):   # compare() fails an answer calling the reference
        found[label](answer, **options)


def labels() -> list[str]:
    return sorted(checks())
