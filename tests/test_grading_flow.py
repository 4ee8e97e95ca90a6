"""The checks of assignment 02 (tarflow_ref/grading/flow.py): the package's own functions pass, and
each mistake the module docstring lists, written here as a small wrong function, is caught with a
message that names it; a wrong shape, None or NaN gets a clear message; NotImplementedError (the
student version before any code is written) propagates unchanged.
"""
import numpy as np
import pytest

from tarflow_ref import flow
from tarflow_ref.grading import flow as grading
from tarflow_ref.grading.flow import check_flow_forward, check_flow_inverse, check_shift
from tarflow_ref.grading.problems import TOY, toy_conditioner
from tarflow_ref.grading.report import CheckFailed

from conftest import not_implemented, with_nan


@pytest.fixture
def reference(monkeypatch):
    """(forward, inverse): the student's signatures, answered by flow.block_forward / block_inverse
    on the block behind each conditioner f the checks pose (recorded as they pose it)."""
    block_of = {}

    def recording(seed=0, cfg=TOY):
        f, pb = toy_conditioner(seed, cfg)
        block_of[f] = pb
        return f, pb
    monkeypatch.setattr(grading, "toy_conditioner", recording)
    return (lambda u, f: flow.block_forward(block_of[f], u, None, TOY),
            lambda z, f: flow.block_inverse(block_of[f], z, None, TOY))


# ---- shift ------------------------------------------------------------------------------------

def shift_in_place(o):
    o[:, 1:] = o[:, :-1].copy()
    o[:, 0] = 0.0
    return o


def test_shift_passes_the_reference(capsys):
    check_shift(flow.shift)
    assert capsys.readouterr().out.startswith("PASS shift:")


@pytest.mark.parametrize("wrong, message", [
    (lambda o: np.concatenate([o[:, 1:], np.zeros_like(o[:, :1])], axis=1), "wrong way"),
    (lambda o: np.roll(o, -1, axis=1), "wrong way"),
    (lambda o: np.roll(o, 1, axis=1), "wrapped around to token 0"),
    (lambda o: np.concatenate([np.zeros_like(o[..., :1]), o[..., :-1]], axis=2), "not axis 2"),
    (lambda o: np.concatenate([np.zeros_like(o[:1]), o[:-1]], axis=0), "not axis 0"),
    (shift_in_place, r"changed its argument [ouz] in place"),
    (lambda o: None, "returned None"),
    (lambda o: o[:, :-1], r"expected shape \(2, 5, 3\), got \(2, 4, 3\)"),
    (lambda o: with_nan(flow.shift(o)), "not finite"),
], ids=["wrong-way", "wrong-way-roll", "wraps", "value-axis", "batch-axis", "in-place", "none", "shape", "nan"])
def test_shift_catches(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_shift(wrong)


def test_shift_not_implemented_propagates():
    with pytest.raises(NotImplementedError):
        check_shift(not_implemented)


# ---- flow_forward -----------------------------------------------------------------------------

def affine(u, f, shift=flow.shift, sign=-1.0):
    """z = (u - m) exp(sign a) from the shifted conditioner output, and -mean(a): the forward
    formula with a slot for each mistake."""
    a, m = (shift(x) for x in f(u))
    return (u - m) * np.exp(sign * a), -a.mean(axis=(1, 2))


def forward_in_place(u, f):
    a, m = (flow.shift(x) for x in f(u))
    u -= m
    u *= np.exp(-a)
    return u, -a.mean(axis=(1, 2))


def test_flow_forward_passes_the_reference(reference, capsys):
    forward, _ = reference
    check_flow_forward(forward)
    assert capsys.readouterr().out.startswith("PASS flow_forward:")


@pytest.mark.parametrize("mistake, message", [
    (lambda z, logdet, u: (z, logdet * u.shape[1] * u.shape[2]), "MEAN over the T D values"),
    (lambda z, logdet, u: (z, -logdet), "logdet has the wrong sign"),
    (lambda z, logdet, u: (z, logdet.mean()), r"logdet \(one value per sample\): expected shape"),
    (lambda z, logdet, u: z, "return the pair"),
    (lambda z, logdet, u: None, r"got None \(a missing `return`\?\)"),
    (lambda z, logdet, u: (z[:, 1:], logdet), "z: expected shape"),
    (lambda z, logdet, u: (with_nan(z), logdet), "not finite"),
], ids=["sum", "logdet-sign", "batch-mean", "only-z", "none", "shape", "nan"])
def test_flow_forward_catches_wrong_outputs(reference, mistake, message):
    forward, _ = reference
    with pytest.raises(CheckFailed, match=message):
        check_flow_forward(lambda u, f: mistake(*forward(u, f), u))


@pytest.mark.parametrize("wrong, message", [
    (lambda u, f: affine(u, f, shift=lambda o: o), r"value \d of z_0 changed .* is the shift missing"),
    (lambda u, f: affine(u, f, sign=1.0), "note the minus in the exponent"),
    (lambda u, f: affine(u, f, shift=lambda o: np.roll(o, -1, axis=1)), r"z_0 changed when only u_1 \(a later"),
    (lambda u, f: affine(u, f, shift=lambda o: np.roll(o, 1, axis=1)), "wrapped around"),
    (forward_in_place, r"changed its argument [ouz] in place"),
], ids=["no-shift", "exponent-sign", "wrong-way", "wraps", "in-place"])
def test_flow_forward_catches_wrong_formulas(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_flow_forward(wrong)


def test_finite_difference_jacobian_is_block_triangular_with_the_logdet(reference):
    """The checker's brute-force Jacobian itself, on the reference forward: block lower-triangular,
    diagonal blocks exp(-a_t) (a from the conditioner directly), log|det| / (T D) = logdet."""
    forward, _ = reference
    f, _ = grading.toy_conditioner(3)
    u = np.random.default_rng(3).uniform(-1, 1, (1, 5, TOY.token_dim))
    jac = grading.finite_difference_jacobian(forward, u[0], f)
    a = flow.shift(f(u)[0])[0]                                                     # [T, D]
    np.testing.assert_allclose(np.diag(jac), np.exp(-a).ravel(), rtol=1e-8)
    assert np.abs(np.triu(jac, 1)).max() < 1e-12
    assert np.abs(np.tril(jac, -TOY.token_dim)).max() > 1e-2                       # earlier tokens do matter
    np.testing.assert_allclose(np.linalg.slogdet(jac)[1] / jac.shape[0], forward(u, f)[1][0], atol=1e-8)


def test_flow_forward_not_implemented_propagates():
    with pytest.raises(NotImplementedError):
        check_flow_forward(not_implemented)


# ---- flow_inverse -----------------------------------------------------------------------------

def decode(z, f, sign=1.0, lag=1, copy=True):
    """u_t = z_t exp(sign a) + m with (a, m) the output of f at position t - lag for the prefix
    decoded so far (tokens 1..T-1 in turn; token 0 stays z_0): lag = 1, sign = 1 is the inverse,
    other values are mistakes."""
    u = z.copy() if copy else z
    for t in range(1, z.shape[1]):
        a, m = f(u[:, :t + 1 - lag])
        u[:, t] = z[:, t] * np.exp(sign * a[:, t - lag]) + m[:, t - lag]
    return u


def one_parallel_pass(z, f):
    a, m = (flow.shift(x) for x in f(z))
    return z * np.exp(a) + m


def unshifted(z, f):
    """Token t from the output at position t, for every t: token 0 moves."""
    u = z.copy()
    for t in range(z.shape[1]):
        a, m = f(u[:, :t + 1])
        u[:, t] = z[:, t] * np.exp(a[:, t]) + m[:, t]
    return u


def test_flow_inverse_passes_the_reference(reference, capsys):
    _, inverse = reference
    check_flow_inverse(inverse)
    assert capsys.readouterr().out.startswith("PASS flow_inverse:")


def test_decode_is_the_inverse_that_the_mistakes_modify():
    """decode with its default arguments passes, so each mistake below fails for its own reason."""
    check_flow_inverse(decode)


@pytest.mark.parametrize("wrong, message", [
    (one_parallel_pass, "one parallel pass"),
    (unshifted, "token 0 must pass unchanged"),
    (lambda z, f: decode(z, f, lag=0), r"tokens 0\.\.0 only; token 1 is off"),
    (lambda z, f: decode(z, f, sign=-1.0), r"token 1 used exp\(-a\)"),
    (lambda z, f: decode(z, f, copy=False), r"changed its argument [ouz] in place"),
    (lambda z, f: None, "returned None"),
    (lambda z, f: decode(z, f)[:, 1:], r"expected shape \(2, 16, 2\), got \(2, 15, 2\)"),
    (lambda z, f: with_nan(decode(z, f)), "not finite"),
], ids=["one-pass", "token-0-moved", "off-by-one", "exp-minus-a", "in-place", "none", "shape", "nan"])
def test_flow_inverse_catches(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_flow_inverse(wrong)


def test_flow_inverse_not_implemented_propagates():
    with pytest.raises(NotImplementedError):
        check_flow_inverse(not_implemented)
