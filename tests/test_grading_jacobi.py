"""The checks of assignment 03 (tarflow_ref/grading/jacobi.py): right solutions pass, each mistake
their docstring lists is caught with a message naming it, bad returns get a clear message, and
NotImplementedError (the student version's placeholder) propagates unchanged.

The right solutions here are built from the package (jacobi.solve_block and affine_step, flow.shift),
not copied from the notebook: solve_block runs on a conditioner that starts at position 0 by
re-reading the inputs it was given so far, which stand in for the KV cache.
"""
import numpy as np
import pytest

from tarflow_ref.flow import shift
from tarflow_ref.grading.jacobi import check_gs_jacobi_inverse, check_jacobi_inverse, check_jacobi_update
from tarflow_ref.grading.report import CheckFailed
from tarflow_ref.jacobi import affine_step, solve_block
from tarflow_ref.strategy import BlockPlan

# ------------------------------------------------------------------ right solutions, from the package


def cached(f, z):
    """evaluate(chunk, start) for solve_block from f, which only reads tokens from position 0."""
    seen = np.zeros_like(z)                          # [B, T, D]: the inputs passed so far

    def evaluate(chunk, start):
        end = start + chunk.shape[1]
        seen[:, start:end] = chunk
        a, m = f(seen[:, :end])
        return a[:, start:], m[:, start:]
    return evaluate


def jacobi_update(x, z, f):
    a, m = f(x)
    return affine_step(z, shift(a), shift(m), clamp=False)


def jacobi_inverse(z, f, iterations):
    return solve_block(z, cached(f, z), BlockPlan(1, iterations))


def gs_jacobi_inverse(z, f, modules, iterations):
    return solve_block(z, cached(f, z), BlockPlan(modules, iterations))


def test_right_solutions_pass(capsys):
    check_jacobi_update(jacobi_update)
    check_jacobi_inverse(jacobi_inverse)
    check_gs_jacobi_inverse(gs_jacobi_inverse)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["PASS jacobi_update", "PASS jacobi_inverse",
                                                      "PASS gs_jacobi_inverse"]


# ------------------------------------------------------------------ (a) one Jacobi iteration

def keeps_x0(x, z, f):
    a, m = f(x)
    F = x.copy()
    F[:, 1:] = z[:, 1:] * np.exp(a[:, :-1]) + m[:, :-1]
    return F


def zero_token_0(x, z, f):
    F = jacobi_update(x, z, f)
    F[:, 0] = 0.0
    return F


def rolls(x, z, f):
    a, m = f(x)
    return z * np.exp(np.roll(a, 1, axis=1)) + np.roll(m, 1, axis=1)


def no_shift(x, z, f):
    a, m = f(x)
    F = z.copy()
    F[:, 1:] = z[:, 1:] * np.exp(a[:, 1:]) + m[:, 1:]
    return F


def x_for_z(x, z, f):
    a, m = f(x)
    F = affine_step(x, shift(a), shift(m), clamp=False)
    F[:, 0] = z[:, 0]
    return F


def forward_formula(x, z, f):
    a, m = f(x)
    return (z - shift(m)) * np.exp(-shift(a))


def f_of_z(x, z, f):
    return jacobi_update(z, z, f)


def token_by_token(x, z, f):
    F = x.copy()
    F[:, 0] = z[:, 0]
    for t in range(z.shape[1] - 1):
        a, m = f(F[:, :t + 1])
        F[:, t + 1] = z[:, t + 1] * np.exp(a[:, t]) + m[:, t]
    return F


def writes_into_x(x, z, f):
    a, m = f(x)
    x[:, 1:] = z[:, 1:] * np.exp(a[:, :-1]) + m[:, :-1]
    x[:, 0] = z[:, 0]
    return x


@pytest.mark.parametrize("wrong, match", [
    (keeps_x0, r"token 0 must pass unchanged, F\(x\)_0 = z_0, but it is off by .* \(it is x_0\)"),
    (zero_token_0, r"token 0 must pass unchanged, F\(x\)_0 = z_0, but it is off by [0-9.]+$"),
    (rolls, r"token 0 must pass unchanged"),
    (no_shift, r"token 8 of F\(x\) changed when only x_8 changed; .*shift by one token"),
    (x_for_z, r"token 8 of F\(x\) changed when only x_8 changed; .*z_\(t\+1\), not x_\(t\+1\)"),
    (forward_formula, r"fixed point.*exp\(-a\) is the forward direction"),
    (f_of_z, r"at the exact inverse x\*.*fixed point.*f\(x\) of the given x"),
    (token_by_token, r"jacobi_update\(x, z, f\) on B=2, T=16: entry .*one call of f, all tokens at once"),
    (writes_into_x, r"changed its argument x in place"),
])
def test_jacobi_update_mistakes_are_caught(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        check_jacobi_update(wrong)


# ------------------------------------------------------------------ (b) plain Jacobi

def too_few(z, f, iterations):
    return jacobi_inverse(z, f, iterations - 1) if iterations > 1 else z.copy()


def too_many(z, f, iterations):
    return jacobi_inverse(z, f, iterations + 1)


def from_zeros(z, f, iterations):
    x = np.zeros_like(z)
    for _ in range(iterations):
        x = jacobi_update(x, z, f)
    return x


def gauss_seidel(z, f, iterations):
    x = z.copy()
    for _ in range(iterations):
        for t in range(z.shape[1] - 1):              # each token sees the ones updated just before it
            a, m = f(x[:, :t + 1])
            x[:, t + 1] = z[:, t + 1] * np.exp(a[:, t]) + m[:, t]
    return x


def writes_into_z(z, f, iterations):
    x = z
    for _ in range(iterations):
        x[:] = jacobi_update(x, z, f)
    return x


@pytest.mark.parametrize("wrong, match", [
    (too_few, r"after 1 iteration tokens 0..1 must equal the exact inverse .*token 1 is off by .*one iteration "
              r"too few"),
    (too_many, r"jacobi_inverse\(z, f, 1\) on B=2, T=16: .*it equals 2 iterations: .*one iteration too many"),
    (from_zeros, r"tokens 0..1 must equal the exact inverse .*token 1 .*start from x\^0 = z"),
    (gauss_seidel, r"tokens 0..15 are exact already, more than 1 Jacobi iteration can give: .*Gauss-Seidel"),
    (writes_into_z, r"changed its argument z in place"),
])
def test_jacobi_inverse_mistakes_are_caught(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        check_jacobi_inverse(wrong)


# ------------------------------------------------------------------ (c) GS-Jacobi

def gs_jacobi(z, f, modules, iterations, size=None, first_token=True, window=None):
    """GS-Jacobi from its definition, with switches for the mistakes below."""
    T = z.shape[1]
    M = size or T // modules
    x = z.copy()
    for s in range(0, T, M):
        e = s + M
        if first_token:
            x[:, s] = jacobi_update(x[:, :s + 1], z[:, :s + 1], f)[:, s]
        stop = window or e
        for _ in range(iterations):
            x[:, s + 1:stop] = jacobi_update(x[:, :stop], z[:, :stop], f)[:, s + 1:stop]
    return x


def no_first_token(z, f, modules, iterations):
    return gs_jacobi(z, f, modules, iterations, first_token=False)


def module_size_for_count(z, f, modules, iterations):
    return gs_jacobi(z, f, modules, iterations, size=modules)


def all_later_tokens(z, f, modules, iterations):
    return gs_jacobi(z, f, modules, iterations, window=z.shape[1])


def test_the_definition_used_by_the_mistakes_passes(capsys):
    check_gs_jacobi_inverse(gs_jacobi)
    assert capsys.readouterr().out.startswith("PASS gs_jacobi_inverse")


@pytest.mark.parametrize("wrong, match", [
    (no_first_token, r"modules=16, iterations=1\) on B=2, T=16: token 1 is off by .* from the exact inverse \(one "
                     r"token per module is the sequential sampler\); module 1 is token 1 alone: x_1 = F\(x\)_1"),
    (module_size_for_count, r"modules=16, .*it equals 1 module of 16 tokens: cut the T = 16 tokens into 16 "
                            r"modules of T / 16 = 1 token"),
    (all_later_tokens, r"modules=4, iterations=1\) on B=2, T=16: token 6 is off by .* from the package's GS-Jacobi; "
                       r"module 1 holds tokens 4..7: .*on tokens 5..7 only"),
])
def test_gs_jacobi_mistakes_are_caught(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        check_gs_jacobi_inverse(wrong)


# ------------------------------------------------------------------ bad returns, for every check

CHECKS = {
    check_jacobi_update: jacobi_update,
    check_jacobi_inverse: jacobi_inverse,
    check_gs_jacobi_inverse: gs_jacobi_inverse,
}


def returning(right, what):
    def student(*args):
        x = right(*args)
        if what == "none":
            return None
        if what == "shape":
            return x[:, 1:]
        x[:, -1, 0] = np.nan
        return x
    return student


@pytest.mark.parametrize("what, match", [
    ("none", r"returned None \(a missing `return`\?\)"),
    ("shape", r"expected shape \(2, 16, 2\), got \(2, 15, 2\)"),
    ("nan", r"entry \(0, 15, 0\) is nan \(not finite\)"),
])
@pytest.mark.parametrize("check", list(CHECKS), ids=lambda c: c.__name__)
def test_bad_returns_get_a_clear_message(check, what, match):
    with pytest.raises(CheckFailed, match=match):
        check(returning(CHECKS[check], what))


@pytest.mark.parametrize("check", list(CHECKS), ids=lambda c: c.__name__)
def test_not_implemented_propagates(check):
    def student(*args):
        raise NotImplementedError()
    with pytest.raises(NotImplementedError):
        check(student)
