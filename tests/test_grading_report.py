"""The shared pieces of the assignment checks (tarflow_ref/grading/report.py): what they accept,
what they refuse and how they say it."""
import numpy as np
import pytest

from tarflow_ref.grading.report import (
    CheckFailed,
    as_array,
    call_many,
    call_unchanged,
    expect_close,
    hint,
    passed,
    same,
)


def test_as_array_names_what_is_wrong():
    assert as_array("x", [[1, 2]], (1, 2)).dtype == np.float64
    for got, message in ((None, "returned None"), ("abc", "expected an array, got str"),
                         (np.zeros(3), r"expected shape \(1, 2\), got \(3,\)"),
                         ([[1.0, np.inf]], r"entry \(0, 1\) is inf \(not finite\)")):
        with pytest.raises(CheckFailed, match=message):
            as_array("x", got, (1, 2))


def test_expect_close_reports_the_worst_entry_against_the_tolerance():
    want = np.array([[1.0, 1e6], [0.0, 2.0]])
    got = want + np.array([[0.0, 1e-3], [0.0, 0.5]])    # 1e-3 is within 1e-8 * 1e6, 0.5 is not
    with pytest.raises(CheckFailed, match=r"x: entry \(1, 1\) is 2.5, expected 2 \(max abs error 0.5\)"):
        expect_close("x", got, want)
    expect_close("x", want + 5e-11, want)
    assert same(want, want) and not same(got, want)


def test_hint_appends_advice_and_lets_other_errors_through():
    with pytest.raises(CheckFailed, match="x: expected shape .*; look at the axis"):
        with hint("look at the axis"):
            as_array("x", np.zeros(2), (3,))
    with pytest.raises(NotImplementedError):
        with hint("never shown"):
            raise NotImplementedError()


def test_call_unchanged_calls_positionally_and_catches_writes_into_inputs():
    def student(values, factor):          # its own parameter names: the call is positional
        return values * factor
    a = np.arange(3.0)
    assert call_unchanged("f", student, x=a, scale=2.0).tolist() == [0.0, 2.0, 4.0]

    def in_place(values, factor):
        values *= factor
        return values
    with pytest.raises(CheckFailed, match="f: the function changed its argument x in place"):
        call_unchanged("f", in_place, x=a, scale=2.0)


class Batched:
    """A function answered in batches, as a student's function in the kernel is (kernel.KernelFunction):
    every call made, an error returned as a value."""

    def __init__(self, fn):
        self.fn, self.batches = fn, 0

    def batch(self, calls):
        self.batches += 1
        outcomes = []
        for args, kwargs in calls:
            try:
                outcomes.append(self.fn(*args, **kwargs))
            except Exception as err:
                outcomes.append(err)
        return outcomes


def test_call_many_answers_as_calls_one_by_one_would_from_one_batch_too():
    def student(values, factor):
        if factor == 0:
            raise ZeroDivisionError("factor 0")
        return values * factor

    def in_place(values, factor):
        values *= factor
        return values
    calls = [dict(x=np.arange(3.0), scale=2.0), dict(x=np.ones(2), scale=-1.0)]
    batched = Batched(student)
    for fn in (student, batched):
        assert [r.tolist() for r in call_many("f", fn, calls)] == [[0.0, 2.0, 4.0], [-1.0, -1.0]]
    assert batched.batches == 1
    for fn in (in_place, Batched(in_place)):
        with pytest.raises(CheckFailed, match="f: the function changed its argument x in place"):
            call_many("f", fn, [dict(x=np.arange(3.0), scale=2.0)])
    failing = [calls[0], dict(x=np.ones(2), scale=0), dict(x=np.ones(2), scale=0.5)]
    for fn in (student, Batched(student)):
        with pytest.raises(ZeroDivisionError, match="factor 0"):
            call_many("f", fn, failing)


def test_passed_prints_one_line(capsys):
    passed("softmax", "rows sum to 1")
    assert capsys.readouterr().out == "PASS softmax: rows sum to 1\n"
