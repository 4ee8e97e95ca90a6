"""The checks of assignment 04 (tarflow_ref/grading/likelihood.py): the package's own functions
(tarflow_ref/logdet.py) pass, and each mistake the module docstring lists, written here as a small
wrong function, is caught with a message that names it; a wrong shape, None or NaN gets a clear
message; NotImplementedError (the student version before any code is written) propagates unchanged.
"""
import math

import numpy as np
import pytest
import torch

from tarflow_ref import logdet
from tarflow_ref.grading import likelihood as grading
from tarflow_ref.grading.likelihood import check_bits_per_dim, check_dequantize, check_nll_per_dim
from tarflow_ref.grading.report import CheckFailed

from conftest import not_implemented, with_nan

torch.set_num_threads(1)


# ---- dequantize -------------------------------------------------------------------------------

def noisy(x_int, rng, scale=256, noise=lambda rng, shape: rng.uniform(size=shape)):
    """((x_int + u) / scale) * 2 - 1 with u = noise(rng, shape): the formula with a slot for each mistake."""
    return (np.asarray(x_int, dtype=np.float64) + noise(rng, np.shape(x_int))) / scale * 2 - 1


def dequantize_in_place(x_int, rng):
    x = logdet.dequantize(x_int, rng)
    x_int[...] = 0
    return x


def test_dequantize_passes_the_reference(capsys):
    check_dequantize(logdet.dequantize)
    assert capsys.readouterr().out.startswith("PASS dequantize:")


def test_noisy_is_the_dequantisation_that_the_mistakes_modify():
    check_dequantize(noisy)


@pytest.mark.parametrize("wrong, message", [
    (lambda x, rng: noisy(x, rng, scale=255), "divided by 255"),
    (lambda x, rng: x / 256 * 2 - 1, "no noise was added"),
    (lambda x, rng: x / 255 * 2 - 1, "the model's input"),
    (lambda x, rng: (x + rng.uniform(size=x.shape)) / 256, r"lie in \[0, 1\]"),
    (lambda x, rng: (2 * x + 2 * rng.uniform(size=x.shape)) / 256 - 1, r"outside its bin .* wraps around"),
    (lambda x, rng: noisy(x, rng, noise=lambda rng, shape: rng.uniform(size=shape) ** 2), "the bin centre"),
    (lambda x, rng: noisy(x, np.random.default_rng(123)), "in ONE call from the rng you are given"),
    (lambda x, rng: noisy(x, rng, noise=lambda rng, shape: rng.uniform(size=shape[::-1]).T), "in ONE call"),
    (dequantize_in_place, "changed its argument x_int in place"),
    (lambda x, rng: None, "returned None"),
    (lambda x, rng: noisy(x, rng).ravel(), r"expected shape \(2, 1, 8, 8\), got \(128,\)"),
    (lambda x, rng: with_nan(noisy(x, rng)), "not finite"),
], ids=["255", "no-noise", "model-input", "unit-range", "uint8-wraps", "not-uniform", "other-generator",
        "draw-order", "in-place", "none", "shape", "nan"])
def test_dequantize_catches(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_dequantize(wrong)


def test_dequantize_not_implemented_propagates():
    with pytest.raises(NotImplementedError):
        check_dequantize(not_implemented)


# ---- nll_per_dim ------------------------------------------------------------------------------

def half_mean_square(z):
    return 0.5 * (z ** 2).reshape(len(z), -1).mean(-1)


def nll_in_place(z, logdet_):
    z **= 2
    return 0.5 * z.reshape(len(z), -1).mean(-1) + 0.5 * logdet.LOG_2PI - logdet_


def test_nll_per_dim_passes_the_reference(capsys):
    check_nll_per_dim(logdet.nll_per_dim)
    assert capsys.readouterr().out.startswith("PASS nll_per_dim:")


def test_affine_flow_nll_is_the_reference_nll():
    """The checker's analytic case: -log N(x; mu, s^2) by scipy, averaged, is prior_nll(z) - logdet."""
    x = np.random.default_rng(9).uniform(-1, 1, (3, 7, 3))
    z, ld, nll = grading.affine_flow(9, 3, 7, 3, x)
    np.testing.assert_allclose(nll, logdet.nll_per_dim(z, ld), rtol=1e-12)
    assert np.ptp(ld) > 0.1                                           # a real, per-sample log-det


@pytest.mark.parametrize("wrong, message", [
    (lambda z, ld: logdet.nll_per_dim(z, ld) - 0.5 * logdet.LOG_2PI, r"constant 0\.5 log\(2 pi\) is missing"),
    (lambda z, ld: logdet.prior_nll(z) + ld, "logdet has the wrong sign"),
    (lambda z, ld: z[0].size * logdet.nll_per_dim(z, ld), "a sum over the T D values"),
    (lambda z, ld: 0.5 * (z ** 2).reshape(len(z), -1).sum(-1) + 0.5 * logdet.LOG_2PI - ld, "0.5 z.2 was summed"),
    (lambda z, ld: 0.5 * (z ** 2).mean() + 0.5 * logdet.LOG_2PI - ld, "ran over the whole batch"),
    (lambda z, ld: np.full(len(z), logdet.nll_per_dim(z, ld).mean()), "every sample got the batch mean"),
    (lambda z, ld: logdet.nll_per_dim(z, ld).mean(), r"\(one value per sample\): expected shape \(2,\), got \(\)"),
    (lambda z, ld: 2 * half_mean_square(z) + 0.5 * logdet.LOG_2PI - ld, r"0\.5 mean_\{t,d\} z\^2"),
    (nll_in_place, "changed its argument z in place"),
    (lambda z, ld: None, "returned None"),
    (lambda z, ld: with_nan(logdet.nll_per_dim(z, ld)), "not finite"),
], ids=["no-log-2pi", "plus-logdet", "sum", "sum-of-squares", "batch-mean-of-z2", "batch-mean",
        "scalar", "no-half", "in-place", "none", "nan"])
def test_nll_per_dim_catches(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_nll_per_dim(wrong)


def test_nll_per_dim_not_implemented_propagates():
    with pytest.raises(NotImplementedError):
        check_nll_per_dim(not_implemented)


# ---- bits_per_dim -----------------------------------------------------------------------------

def bits(z, ld, offset=math.log(128), unit=math.log(2)):
    return (logdet.nll_per_dim(z, ld) + offset) / unit


def test_bits_per_dim_passes_the_reference_and_reproduces_the_cli(capsys):
    check_bits_per_dim(logdet.bits_per_dim)
    out = capsys.readouterr().out
    assert out.startswith("PASS bits_per_dim:")
    assert "6.543 bits/dim on the 360 held-out digits" in out       # tarflow_ref/assets/README.md, labelled


def test_digits_flow_unlabelled_is_the_cli_number():
    """`python -m tarflow_ref bpd --unlabelled` prints 6.816 (tarflow_ref/assets/README.md)."""
    z, ld = grading.digits_flow(labelled=False)
    assert z.shape == (360, 64, 1) and ld.shape == (360,)
    assert round(float(logdet.bits_per_dim(z, ld).mean()), 3) == 6.816


@pytest.mark.parametrize("wrong, message", [
    (lambda z, ld: bits(z, ld, offset=math.log(256)), "exactly one bit too many"),
    (lambda z, ld: bits(z, ld, unit=1.0), "the result is in nats"),
    (lambda z, ld: bits(z, ld, offset=0.0), "the dequantisation scale is missing"),
    (lambda z, ld: logdet.nll_per_dim(z, ld), "that is the NLL per dimension in nats"),
    (lambda z, ld: bits(z, ld, offset=0.0) + math.log(128), "log 128 nats were added to a value in bits"),
    (lambda z, ld: bits(z, ld) + 0.01, r"\(nll_per_dim\(z, logdet\) \+ log 128\) / log 2"),
    (lambda z, ld: bits(z, ld)[:1], r"\(one value per sample\): expected shape \(2,\), got \(1,\)"),
    (lambda z, ld: None, "returned None"),
    (lambda z, ld: with_nan(bits(z, ld)), "not finite"),
], ids=["log-256", "nats", "no-scale", "nll-in-nats", "nats-plus-bits", "other", "shape", "none", "nan"])
def test_bits_per_dim_catches(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_bits_per_dim(wrong)


def test_bits_per_dim_in_place_is_caught():
    def in_place(z, ld):
        out = logdet.bits_per_dim(z, ld)
        ld -= math.log(128)
        return out
    with pytest.raises(CheckFailed, match="changed its argument logdet in place"):
        check_bits_per_dim(in_place)


def test_bits_per_dim_not_implemented_propagates():
    with pytest.raises(NotImplementedError):
        check_bits_per_dim(not_implemented)
