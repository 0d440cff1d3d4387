"""How the book's exercises are graded (hand-written plumbing): the comparison every chapter's checks
share. A check calls the student's function and the reference on the same cases, prints
``ex-CC-N: pass`` or the first case that fails, and raises :class:`ExerciseFailed`.
"""
from __future__ import annotations

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
