"""How the book's exercises are graded (hand-written plumbing): the comparison every chapter's checks
share. A check calls the student's function and the reference on the same cases, prints
``ex-CC-N: pass`` or the first case that fails, and raises :class:`ExerciseFailed`.

An answer that calls the reference (the grader's own function, or the package function the
grader wraps) would pass without computing anything, so :func:`compare` watches the student's
function run (``sys.setprofile``) and fails it when it calls into the reference's code.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
import functools
from pathlib import Path
import signal
import sys
import threading

import numpy as np

GRADER_DIR = Path(__file__).resolve().parent    # frames of code in here are the grader's
_answer = ContextVar("answer", default=None)    # what the student handed to check()
TIME_LIMIT = 10.0                               # seconds a student's function may take per case
_time_limit = ContextVar("time_limit", default=TIME_LIMIT)


class ExerciseFailed(AssertionError):
    """A student's answer differs from the reference; the message names the first failing case."""


class _TimedOut(BaseException):
    """Raised in a student's function at its time limit: a BaseException, so that the answer's
    own `except Exception` cannot swallow it."""


@contextmanager
def time_limit(seconds: float | None):
    """Stop the code inside after `seconds` (None: no limit) with _TimedOut, by SIGALRM. Only
    the main thread can take signals (a notebook's cells, pytest, nbgrader all run there);
    elsewhere, or where SIGALRM does not exist, there is no limit."""
    if seconds is None or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise _TimedOut
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _fail(label: str, message: str):
    print(f"{label}: FAIL\n{message}")
    raise ExerciseFailed(f"{label}: {message}")


@contextmanager
def student_answer(answer, seconds: float | None = TIME_LIMIT):
    """While a check runs: the student's answer as check() received it, and the time its
    function may take per case. A check may wrap the answer (to sort its levels, say); compare()
    then still knows which function is the student's."""
    token, limit = _answer.set(answer), _time_limit.set(seconds)
    try:
        yield
    finally:
        _answer.reset(token)
        _time_limit.reset(limit)


def compare(label: str, student_fn, reference_fn, cases, close) -> None:
    """Call student_fn(*args) and reference_fn(*args) for each args in cases; fail on the first
    where close(got, want) is false, the student's function raises, or it calls the reference."""
    cases = list(cases)
    answer = _answer.get()
    answer_codes = {_code_of(answer if answer is not None else student_fn)} - {None}
    reference = {_code_of(reference_fn)} - {None}
    for i, args in enumerate(cases):
        want, wrapped = _reference_calls(reference_fn, args)
        reference |= wrapped
        try:
            with time_limit(_time_limit.get()):
                got, error, reached = _student_calls(student_fn, args, reference, answer_codes)
        except _TimedOut:
            _fail(label, f"case {i}: {_short(args)}\n  took longer than {_time_limit.get()} s "
                         "(a loop that never ends? check(..., time_limit=...) allows more)")
        if reached is not None:
            _fail(label, f"case {i}: {_short(args)}\n  the answer calls the reference "
                         f"{_describe(reached)}: write it yourself")
        if error is not None:
            _fail(label, f"case {i}: {_short(args)}\n  raised {type(error).__name__}: {error}")
        ok = False
        try:
            ok = bool(close(got, want))
        except Exception:   # a wrong type or shape is a wrong answer
            pass
        if not ok:
            _fail(label, f"case {i}: {_short(args)}\n  expected {_short(want)}\n"
                         f"  got      {_short(got)}")
    print(f"{label}: pass ({len(cases)} cases)")


def _code_of(fn):
    """The code object a Python function (a bound method, a functools.partial) runs, else None."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    return getattr(fn, "__code__", None)


def _is_wrapper(fn) -> bool:
    """A lambda or a function defined inside a check: it wraps the reference proper."""
    name = getattr(fn, "__qualname__", "")
    return "<lambda>" in name or "<locals>" in name


def _reference_calls(reference_fn, args: tuple):
    """reference_fn(*args), and the code of the Python functions a wrapper reference (a lambda or
    a nested function) calls directly with one of args as it is, or with any arguments when args
    is empty: the reference proper. Helpers it calls on new values (a transposed tensor, a
    tensor built from a dict) stay open to students."""
    code = _code_of(reference_fn)
    if code is None or not _is_wrapper(reference_fn):
        return reference_fn(*args), set()
    found = set()

    def profile(frame, event, _):
        if event == "call" and frame.f_back is not None and frame.f_back.f_code is code:
            if not args or any(_is_one_of(v, args) for v in frame.f_locals.values()):
                found.add(frame.f_code)
    return _profiled(profile, reference_fn, args)[0], found


def _is_one_of(value, args: tuple) -> bool:
    """Is value one of args, or (a *args tuple, a **kwargs dict) does it hold one of them?"""
    inner = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else ()
    return any(value is a for a in args) or any(v is a for v in inner for a in args)


def _student_calls(student_fn, args: tuple, reference: set, answer_codes: set):
    """(result or None, the exception it raised or None, the reference code it reached or None)
    of student_fn(*args). A call into the reference counts when the function called is the
    student's answer itself, or when code outside the grader (the student's, or package code the
    student called) is on the stack below it; the grader's own helpers may call it."""
    reached = []
    top = sys._getframe()

    def profile(frame, event, _):
        if event == "call" and frame.f_code in reference and not reached:
            if frame.f_code in answer_codes or _outside_grader(frame.f_back, top):
                reached.append(frame.f_code)
    try:
        result = _profiled(profile, student_fn, args)[0]
    except Exception as e:  # a check reports a failure; it does not crash the grader
        return None, e, reached[0] if reached else None
    return result, None, reached[0] if reached else None


def _outside_grader(frame, top) -> bool:
    """Is any frame from `frame` down to (not including) `top` running code outside GRADER_DIR?"""
    while frame is not None and frame is not top:
        if not _in_grader(frame.f_code.co_filename):
            return True
        frame = frame.f_back
    return False


@functools.lru_cache(maxsize=None)
def _in_grader(filename: str) -> bool:
    return Path(filename).resolve().parent == GRADER_DIR


def _profiled(profile, fn, args: tuple):
    """(fn(*args),) with `profile` as this thread's profiler meanwhile (the previous one after)."""
    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        return (fn(*args),)
    finally:
        sys.setprofile(previous)


def _describe(code) -> str:
    """'elo_update (qlora_mini/studies/elo.py)': a code object's name and file."""
    path = Path(code.co_filename)
    parts = path.parts
    shown = "/".join(parts[parts.index("qlora_mini"):]) if "qlora_mini" in parts else path.name
    return f"{getattr(code, 'co_qualname', code.co_name)} ({shown})"


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
