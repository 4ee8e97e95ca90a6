"""What a check says: one PASS line, or a CheckFailed that names the problem.

A check runs a student's function on seeded inputs and compares the result with the package's
reference and with a property that needs no reference (causality, inverse o forward = identity,
a brute-force Jacobian). CheckFailed is an AssertionError, so nbgrader's autograder, pytest and a
plain notebook run all count it as a failure; its message says which quantity, for which input,
at which entry, and by how much, so a student learns what to fix rather than only that it is wrong.
"""
from contextlib import contextmanager

import numpy as np


class CheckFailed(AssertionError):
    """A student's result is wrong; the message says where and by how much."""


def as_array(name, got, shape):
    """got as a NumPy array of the expected shape, with only finite entries, or CheckFailed."""
    if got is None:
        raise CheckFailed(f"{name}: the function returned None (a missing `return`?)")
    try:
        arr = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise CheckFailed(f"{name}: expected an array, got {type(got).__name__} ({err})") from None
    if arr.shape != tuple(shape):
        raise CheckFailed(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    if not np.isfinite(arr).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise CheckFailed(f"{name}: entry {bad} is {arr[bad]} (not finite)")
    return arr


def expect_close(name, got, want, rtol=1e-8, atol=1e-10):
    """CheckFailed unless got == want entrywise within atol + rtol |want| (float64 arithmetic
    agrees far closer than that; a wrong formula misses by many orders more)."""
    want = np.asarray(want, dtype=np.float64)
    got = as_array(name, got, want.shape)
    excess = np.abs(got - want) - (atol + rtol * np.abs(want))
    if (excess > 0).any():
        worst = np.unravel_index(np.argmax(excess), want.shape)
        index = tuple(int(i) for i in worst)
        raise CheckFailed(f"{name}: entry {index} is {got[worst]:.6g}, expected {want[worst]:.6g} "
                          f"(max abs error {np.abs(got - want).max():.3g})")
    return got


def as_pair(name, out, names, shapes):
    """The two arrays of a function that must return a pair, e.g. (z, logdet): each checked by
    as_array against its name and shape."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        what = "None (a missing `return`?)" if out is None else type(out).__name__
        raise CheckFailed(f"{name}: return the pair ({', '.join(names)}), got {what}")
    return tuple(as_array(f"{name}: {n}", o, shape) for n, o, shape in zip(names, out, shapes))


def first_wrong_token(got, want, rtol=1e-8, atol=1e-10):
    """The first token t (axis 1 of [B, T, ...] arrays) where got and want differ beyond
    expect_close's tolerance, or T when none does: expect_close names the worst entry, while a
    student of a token-by-token algorithm needs the first wrong token."""
    ok = np.isclose(got, want, rtol=rtol, atol=atol).reshape(got.shape[0], got.shape[1], -1).all(axis=(0, 2))
    return len(ok) if ok.all() else int(np.argmin(ok))


def same(got, want, rtol=1e-8, atol=1e-10):
    """True when got matches want as expect_close would accept (to name a known mistake)."""
    try:
        expect_close("", got, want, rtol, atol)
    except CheckFailed:
        return False
    return True


@contextmanager
def hint(text):
    """Append what the student should look at to a CheckFailed raised inside the block."""
    try:
        yield
    except CheckFailed as err:
        raise CheckFailed(f"{err}; {text}") from None


def call_unchanged(name, fn, **args):
    """fn(*args.values()), positionally (a student's parameter names are theirs to choose), with
    CheckFailed if fn wrote into an array it was given: the check reuses its inputs, and so does
    the student's own code that calls fn."""
    saved = {key: value.copy() for key, value in args.items() if isinstance(value, np.ndarray)}
    out = fn(*args.values())
    expect_unchanged(name, args, saved)
    return out


def expect_unchanged(name, args: dict, saved: dict):
    """CheckFailed if an array of args differs from its copy in saved (the function wrote into it)."""
    for key, value in saved.items():
        if not np.array_equal(args[key], value, equal_nan=True):
            raise CheckFailed(f"{name}: the function changed its argument {key} in place; work on a copy "
                              f"(e.g. new = {key}.copy()) so that the caller's {key} stays as it was")


def call_many(name, fn, calls: list[dict]) -> list:
    """[call_unchanged(name, fn, **args) for args in calls]: the same results and the same errors, in
    the same order; a student's function in another process (grading.kernel.KernelFunction, which
    has `batch`) answers all of them in one round trip."""
    batch = getattr(fn, "batch", None)
    if batch is None:
        return [call_unchanged(name, fn, **args) for args in calls]
    saved = [{key: value.copy() for key, value in args.items() if isinstance(value, np.ndarray)} for args in calls]
    outcomes = batch([(list(args.values()), {}) for args in calls])
    for args, before, out in zip(calls, saved, outcomes):
        if isinstance(out, BaseException):
            raise out
        expect_unchanged(name, args, before)
    return outcomes


def passed(name, what):
    """Print the PASS line (the checks' only output, so nbval can compare it)."""
    print(f"PASS {name}: {what}")
