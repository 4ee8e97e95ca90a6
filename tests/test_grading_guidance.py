"""The checks of assignment 05 (tarflow_ref/grading/guidance.py): the package's own functions pass,
and each mistake the module docstring lists, written here as a small wrong function, is caught with
a message that names it; a wrong shape, None or NaN gets a clear message; NotImplementedError (the
student version before any code is written) propagates unchanged.
"""
import numpy as np
import pytest

from tarflow_ref import flow
from tarflow_ref.grading import guidance as grading
from tarflow_ref.grading.guidance import check_annealed_weight, check_guide, check_guided_inverse
from tarflow_ref.grading.problems import TOY_CLASSES, toy_branches
from tarflow_ref.grading.report import CheckFailed
from tarflow_ref.guidance import Guidance, guide

from conftest import not_implemented, with_nan

# ---- guide ------------------------------------------------------------------------------------


def reference_guide(a, m, a_u, m_u, g, what):
    return guide(a, m, a_u, m_u, Guidance(what=what), g)


def guide_in_place(a, m, a_u, m_u, g, what):
    if "a" in what:
        a += g * (a - a_u)
    if "b" in what:
        m += g * (m - m_u)
    return a, m


def guide_both(a, m, a_u, m_u, g, what):
    return a + g * (a - a_u), m + g * (m - m_u)


def test_guide_passes_the_reference(capsys):
    check_guide(reference_guide)
    assert capsys.readouterr().out.startswith("PASS guide:")


@pytest.mark.parametrize("wrong, message", [
    (lambda a, m, a_u, m_u, g, what: reference_guide(a, m, a_u, m_u, -g, what), "sign is flipped"),
    (lambda a, m, a_u, m_u, g, what: reference_guide(a, m, a_u, m_u, g, what) if g else (a - a_u, m - m_u),
     r"with g = 0 guidance is off .* not \(1 \+ g\) a - a_u"),
    (lambda a, m, a_u, m_u, g, what: (g * (a - a_u), g * (m - m_u)), "with g = 0 guidance is off"),
    (lambda a, m, a_u, m_u, g, what: (a + g * a, m + g * m), "nothing to push away from"),
    (guide_both, r"m changed, but what = 'a' does not hold 'b'"),
    (lambda a, m, a_u, m_u, g, what: reference_guide(a, m, a_u, m_u, g * g, what), "grow linearly in g"),
    (guide_in_place, r"changed its argument a in place"),
    (lambda a, m, a_u, m_u, g, what: None, r"got None \(a missing `return`\?\)"),
    (lambda a, m, a_u, m_u, g, what: reference_guide(a, m, a_u, m_u, g, what)[0], "return the pair"),
    (lambda a, m, a_u, m_u, g, what: (a[:, :-1], m), r"a: expected shape \(2, 5, 3\), got \(2, 4, 3\)"),
    (lambda a, m, a_u, m_u, g, what: (a, with_nan(m)), "not finite"),
], ids=["sign", "one-plus-g", "g-times-difference", "no-difference", "ignores-what", "g-squared", "in-place",
        "none", "only-a", "shape", "nan"])
def test_guide_catches(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_guide(wrong)


def test_guide_not_implemented_propagates():
    with pytest.raises(NotImplementedError):
        check_guide(not_implemented)


# ---- annealed_weight --------------------------------------------------------------------------

def test_annealed_weight_passes_the_reference(capsys):
    check_annealed_weight(lambda t, T, g: Guidance(g, annealed=True).weight_at(t, T))
    assert capsys.readouterr().out.startswith("PASS annealed_weight:")


@pytest.mark.parametrize("wrong, message", [
    (lambda t, T, g: g * t / (T - 1), "index off by one"),
    (lambda t, T, g: g * (t + 1) / T, r"g \(t \+ 1\) / T: divide by T - 1"),
    (lambda t, T, g: g, "g at every step"),
    (lambda t, T, g: g * (t + 1) ** 2 / (T - 1) ** 2, r"step 0 \(the one that makes token 1\) gets g / \(T - 1\)"),
    (lambda t, T, g: g if t == T - 2 else g / (T - 1), r"annealed_weight\(t=1, T=16, g=1.5\).*g_t = g \(t \+ 1\)"),
    (lambda t, T, g: None, "returned None"),
    (lambda t, T, g: [g * (t + 1) / (T - 1)], r"expected shape \(\), got \(1,\)"),
    (lambda t, T, g: np.nan, "not finite"),
], ids=["index", "over-T", "constant", "quadratic", "endpoints-only", "none", "list", "nan"])
def test_annealed_weight_catches(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_annealed_weight(wrong)


def test_annealed_weight_not_implemented_propagates():
    with pytest.raises(NotImplementedError):
        check_annealed_weight(not_implemented)


# ---- guided_inverse ---------------------------------------------------------------------------

@pytest.fixture
def reference(monkeypatch):
    """guided_inverse with the student's signature, answered by flow.block_inverse with guidance on
    the block behind the branches the check poses (recorded as it poses them). Given the same
    conditioner twice, the branches agree and guidance has no effect: the plain conditional inverse."""
    block_of, temperature_of = {}, {}

    def recording(seed=0, labels=(0,), temperature=1.0, cfg=TOY_CLASSES):
        f_cond, f_uncond, pb = toy_branches(seed, labels, temperature, cfg)
        block_of[f_cond] = (pb, np.asarray(labels))
        temperature_of[f_uncond] = temperature
        return f_cond, f_uncond, pb
    monkeypatch.setattr(grading, "toy_branches", recording)

    def inverse(z, f_cond, f_uncond, g, what, annealed):
        pb, y = block_of[f_cond]
        guidance = None if f_uncond is f_cond else Guidance(g, what, annealed, temperature_of[f_uncond])
        return flow.block_inverse(pb, z, y, TOY_CLASSES, guidance)
    return inverse


def decode(z, f_cond, f_uncond, g, what, annealed, weight=None, uncond_reads_z=False, guides=None, copy=True):
    """x_0 = z_0, x_(t+1) = z_(t+1) exp(a_t) + m_t with the guided output at position t of the decoded
    prefix; the defaults are the guided inverse, each keyword a slot for one mistake: weight(t, T, g)
    the step's guidance weight, uncond_reads_z feeds z to the unconditional branch, guides the
    terms to guide, copy=False writes into z."""
    T = z.shape[1]
    weight = weight or (lambda t, T, g: Guidance(g, annealed=annealed).weight_at(t, T))
    x = z.copy() if copy else z
    for t in range(T - 1):
        a, m = (o[:, t] for o in f_cond(x[:, :t + 1]))
        a_u, m_u = (o[:, t] for o in f_uncond((z if uncond_reads_z else x)[:, :t + 1]))
        a, m = guide(a, m, a_u, m_u, Guidance(what=guides or what), weight(t, T, g))
        x[:, t + 1] = z[:, t + 1] * np.exp(a) + m
    return x


def test_guided_inverse_passes_the_reference(reference, capsys):
    check_guided_inverse(reference)
    assert capsys.readouterr().out.startswith("PASS guided_inverse:")


def test_decode_is_the_guided_inverse_that_the_mistakes_modify():
    """decode with its default arguments passes, so each mistake below fails for its own reason."""
    check_guided_inverse(decode)


def test_the_problems_need_guidance():
    """On every posed problem guidance moves the inverse far beyond the tolerance, so no mistake can
    pass by a weak effect; and the inverses stay small (no overflow for a student's solver)."""
    for seed, labels, T, guidance in grading.PROBLEMS:
        f_cond, f_uncond, pb = toy_branches(seed, labels, guidance.temperature)
        z = grading.toy_noise(seed, len(labels))[:, :T]
        guided = flow.block_inverse(pb, z, np.asarray(labels), TOY_CLASSES, guidance)
        plain = flow.block_inverse(pb, z, np.asarray(labels), TOY_CLASSES)
        assert np.abs(guided - plain).max() > 0.1 and np.abs(guided).max() < 6


def with_args(**mistake):
    return lambda z, f_cond, f_uncond, g, what, annealed: decode(z, f_cond, f_uncond, g, what, annealed, **mistake)


@pytest.mark.parametrize("wrong, message", [
    (with_args(uncond_reads_z=True), r"f_uncond = f_cond .* both branches must read the same decoded tokens"),
    (with_args(weight=lambda t, T, g: g * t / (T - 1)), "index off by one"),
    (with_args(weight=lambda t, T, g: g * (t + 1) / T), r"was g \(t \+ 1\) / T"),
    (with_args(weight=lambda t, T, g: g), "every step used the full g"),
    (lambda z, f_cond, f_uncond, g, what, annealed: decode(z, f_cond, f_uncond, g, what, True),
     "annealed, but annealed=False"),
    (with_args(guides="ab"), "both a and m were guided, but what = 'a'"),
    (with_args(weight=lambda t, T, g: 0.0), "not guided at all"),
    (lambda z, f_cond, f_uncond, g, what, annealed: np.zeros_like(z), "token 0 must pass unchanged"),
    (with_args(copy=False), "changed its argument z in place"),
    (lambda *args: None, "returned None"),
    (lambda z, *args: decode(z, *args)[:, 1:], r"expected shape \(2, 16, 2\), got \(2, 15, 2\)"),
    (lambda z, *args: with_nan(decode(z, *args)), "not finite"),
], ids=["uncond-reads-z", "anneal-index", "anneal-over-T", "anneal-ignored", "anneal-always", "ignores-what",
        "no-guidance", "token-0", "in-place", "none", "shape", "nan"])
def test_guided_inverse_catches(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_guided_inverse(wrong)


def test_guided_inverse_not_implemented_propagates():
    with pytest.raises(NotImplementedError):
        check_guided_inverse(not_implemented)
