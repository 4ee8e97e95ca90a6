"""Checks of assignment 05: classifier-free guidance in the sequential inverse of a flow block
(Zhai et al. 2024, Sec. 2.6; book/checkpoints.md, "Inverse, guidance and sampling"; book/guidance.md;
notebooks/06_sampling_and_guidance).

A conditional block has two causal conditioners (grading.problems.toy_branches), in the block's
token order: f_cond (label y_i for sample i) and f_uncond (mean class embedding, attention
temperature tau_u), each f(x: [B, n, D]) -> (a, m): [B, n, D], position t seeing x_0..x_t only.

    guide(a, m, a_u, m_u, g, what)   a <- a + g (a - a_u) if 'a' in what,
                                     m <- m + g (m - m_u) if 'b' in what       -> (a, m), same shapes
    annealed_weight(t, T, g)         g_t = g (t + 1) / (T - 1): g / (T - 1) at step 0, g at the last
                                     step t = T - 2                             -> a float
    guided_inverse(z, f_cond, f_uncond, g, what, annealed)
                                     x_0 = z_0,  x_{t+1} = z_{t+1} exp(a_t) + m_t, t = 0..T-2, with
                                     (a_t, m_t) = guide(f_cond(x_0..x_t)_t, f_uncond(x_0..x_t)_t, g_t)
                                     and g_t = annealed_weight(t, T, g) or g    -> x: [B, T, D]

Each check compares with the package (guidance.guide, Guidance.weight_at, flow.block_inverse with
guidance on the toy block of TOY_CLASSES) and first tests properties that need no reference:
  check_guide            g = 0 returns the conditional a, m; equal branches are a fixed point for
                         any g; what = 'a' leaves m as given and what = 'b' leaves a; the result
                         is affine in g, out(g) = out(0) + g (out(1) - out(0)).
  check_annealed_weight  the last step t = T - 2 gets the full g, step 0 gets g / (T - 1).
  check_guided_inverse   with g = 0, and with f_uncond = f_cond for g = 1, x is the plain
                         conditional inverse: the reference forward block with label y maps x
                         back to z. Then the reference on 4 problems: T = 16, 7, 11, 16 tokens,
                         batches 2, 3, 1, 2, labels mixed in a batch, g = 1.5, what in {'ab', 'a',
                         'b'}, annealed on (16 tokens: the reference anneals over the block's T)
                         and off, tau_u in {0.5, 2, 1, 0.3}.

Mistakes each check is built to catch (tests/test_grading_guidance.py writes each one):
  check_guide            the sign, a + g (a_u - a); (1 + g) a - a_u or g (a - a_u) (wrong at g = 0);
                         guiding both terms when what = 'a' (or 'b'); g squared; writing into an
                         input array in place.
  check_annealed_weight  g t / (T - 1) (the index off by one: step 0 unguided, the last step short
                         of g); g (t + 1) / T; no annealing (g at every step).
  check_guided_inverse   the unconditional branch evaluated on z instead of the decoded tokens
                         (the f_uncond = f_cond property); annealing with the wrong index
                         (t / (T - 1), (t + 1) / T); annealing ignored, or applied when annealed =
                         False; `what` ignored (both terms guided); no guidance at all (each named
                         by replaying the rule at every step from the student's own tokens);
                         token 0 changed; writing into z in place.
every check              None, a wrong shape, NaN or inf (via report.as_array).
"""
import numpy as np

from ..flow import block_forward, block_inverse
from ..guidance import Guidance, guide as reference_guide
from ..jacobi import affine_step
from .problems import TOY_CLASSES, toy_branches, toy_noise
from .report import CheckFailed, as_array, as_pair, call_unchanged, expect_close, first_wrong_token, hint, passed, same

# (seed, labels, T, guidance): block seed = noise seed; seeds 2 and 7 keep every guided and
# unguided inverse of toy_noise below 6 in size. Annealed problems use all 16 tokens of the block.
PROBLEMS = (
    (2, (0, 2), 16, Guidance(1.5, "ab", annealed=True, temperature=0.5)),
    (7, (1, 1, 2), 7, Guidance(1.5, "a", temperature=2.0)),
    (2, (2,), 11, Guidance(1.5, "b", temperature=1.0)),
    (7, (0, 2), 16, Guidance(1.5, "b", annealed=True, temperature=0.3)),
)
# guide: arrays of these shapes ([B, n, D], and one step's [B, D]), each with a weight and `what`
GUIDE_CASES = (((2, 5, 3), 1.5, "ab"), ((3, 2), 0.75, "a"), ((1, 7, 4), 2.0, "b"))


def _same_pair(got, want):
    return same(got[0], want[0]) and same(got[1], want[1])


def check_guide(fn):
    """fn(a, m, a_u, m_u, g, what) -> (a, m) guided; prints PASS or raises CheckFailed."""
    rng = np.random.default_rng(5)
    for shape, g, what in GUIDE_CASES:
        a, m, a_u, m_u = (rng.standard_normal(shape) for _ in range(4))

        def call(g, a_u=a_u, m_u=m_u):
            name = f"guide(a, m, a_u, m_u, g={g}, what='{what}') for arrays of shape {list(shape)}"
            out = call_unchanged(name, fn, a=a, m=m, a_u=a_u, m_u=m_u, g=g, what=what)
            return name, as_pair(name, out, ("a", "m"), (shape, shape))

        name, off = call(0.0)
        if not _same_pair(off, (a, m)):
            raise CheckFailed(f"{name}: with g = 0 guidance is off and must return the conditional a and m "
                              f"unchanged; is the update a + g (a - a_u), not (1 + g) a - a_u or g (a - a_u)?")
        name, fixed = call(g, a, m)
        if not _same_pair(fixed, (a, m)):
            raise CheckFailed(f"{name}, with a_u = a and m_u = m: when both branches agree there is nothing to "
                              f"push away from, so a and m must come back unchanged for any g; guide by the "
                              f"DIFFERENCE of the branches, a + g (a - a_u)")
        name, got = call(g)
        for symbol, term, value, given in (("a", "a", got[0], a), ("m", "b", got[1], m)):
            if term not in what and not same(value, given):
                raise CheckFailed(f"{name}: {symbol} changed, but what = '{what}' does not hold '{term}'; guide a "
                                  f"only if 'a' in what, and m (the shift) only if 'b' in what")
        _, one = call(1.0)
        far_name, far = call(2.5)
        if not _same_pair(far, tuple(o + 2.5 * (i - o) for o, i in zip(off, one))):
            raise CheckFailed(f"{far_name}: the guided values must grow linearly in g, out(g) = out(0) + "
                              f"g (out(1) - out(0)); is g squared, or used in an exponent?")
        if _same_pair(got, reference_guide(a, m, a_u, m_u, Guidance(what=what), -g)):
            raise CheckFailed(f"{name}: the sign is flipped; guidance pushes AWAY from the unconditional "
                              f"branch, a + g (a - a_u), not a + g (a_u - a)")
        want = reference_guide(a, m, a_u, m_u, Guidance(what=what), g)
        expect_close(f"{name}: a", got[0], want[0])
        expect_close(f"{name}: m", got[1], want[1])
    passed("guide", "g = 0 and equal branches change nothing, only the terms in `what` move, linear in g; "
           "matches the reference on 3 inputs")


def check_annealed_weight(fn):
    """fn(t, T, g) -> g_t, a number; prints PASS or raises CheckFailed."""
    for T, g in ((16, 1.5), (7, 2.0), (11, 0.5)):
        def call(t):
            name = f"annealed_weight(t={t}, T={T}, g={g})"
            return name, float(as_array(name, call_unchanged(name, fn, t=t, T=T, g=g), ()))
        reference = Guidance(g, annealed=True)
        for t, want, what in ((T - 2, g, "the last step, t = T - 2 (the one that makes token T - 1), gets "
                                         "the full weight g"),
                              (0, g / (T - 1), "step 0 (the one that makes token 1) gets g / (T - 1)")):
            name, got = call(t)
            if not same(got, want):
                raise CheckFailed(f"{name} is {got:.6g}: {what} = {want:.6g}; {_weight_mistake(got, t, T, g)}")
        for t in range(T - 1):
            name, got = call(t)
            with hint("g_t = g (t + 1) / (T - 1)"):
                expect_close(name, got, reference.weight_at(t, T))
    passed("annealed_weight", "step 0 gets g / (T - 1), the last step t = T - 2 the full g; matches "
           "Guidance.weight_at for T = 16, 7, 11")


def _weight_mistake(got, t, T, g):
    """What a wrong annealed weight at step t looks like, in words."""
    if same(got, g * t / (T - 1)):
        return "that is g t / (T - 1), the index off by one: use g (t + 1) / (T - 1)"
    if same(got, g * (t + 1) / T):
        return "that is g (t + 1) / T: divide by T - 1, the number of steps"
    if same(got, g):
        return "that is g at every step: the weight must grow with t, g (t + 1) / (T - 1)"
    return "use g (t + 1) / (T - 1)"


def _step(x, z, f_cond, f_uncond, t, g_t, what):
    """Token t + 1 of a guided inverse from its decoded tokens x[:, :t + 1], both branches reading them."""
    a, m = (o[:, t] for o in f_cond(x[:, :t + 1]))
    a_u, m_u = (o[:, t] for o in f_uncond(x[:, :t + 1]))
    a, m = reference_guide(a, m, a_u, m_u, Guidance(what=what), g_t)
    return affine_step(z[:, t + 1], a, m, clamp=False)


def _inverse_mistake(x, z, f_cond, f_uncond, guidance):
    """The rule a wrong guided inverse x followed at every step (from its own decoded tokens), in words."""
    T, g, what = z.shape[1], guidance.weight, guidance.what
    right = lambda t: guidance.weight_at(t, T)
    if guidance.annealed:
        rules = [("the annealed weight was g t / (T - 1), the index off by one (step 0 unguided, the last step "
                  "short of g): step t uses g (t + 1) / (T - 1)", lambda t: g * t / (T - 1), what),
                 ("the annealed weight was g (t + 1) / T: step t uses g (t + 1) / (T - 1)",
                  lambda t: g * (t + 1) / T, what),
                 ("every step used the full g: with annealed=True step t uses g (t + 1) / (T - 1)", lambda t: g, what)]
    else:
        rules = [("it was annealed, but annealed=False: every step uses the full g",
                  lambda t: g * (t + 1) / (T - 1), what)]
    rules.append(("it was not guided at all: combine both branches with your guide at every step", lambda t: 0.0, what))
    if what != "ab":
        rules.append((f"both a and m were guided, but what = '{what}': pass `what` on to your guide", right, "ab"))
    for text, weight, how in rules:
        if all(same(x[:, t + 1], _step(x, z, f_cond, f_uncond, t, weight(t), how)) for t in range(T - 1)):
            return text
    return ("token t + 1 = z_(t+1) exp(a) + m with (a, m) = guide(...) of both branches at position t, each "
            "evaluated on the decoded tokens x_0..x_t, with weight g_t (annealed: g (t + 1) / (T - 1))")


def _inverse(fn, name, z, f_cond, f_uncond, g, what, annealed):
    return as_array(name, call_unchanged(name, fn, z=z, f_cond=f_cond, f_uncond=f_uncond, g=g, what=what,
                                         annealed=annealed), z.shape)


def _maps_back(name, x, z, pb, labels, why):
    """CheckFailed unless the reference forward block with the labels maps x back to z."""
    back, _ = block_forward(pb, x, np.asarray(labels), TOY_CLASSES)
    n = first_wrong_token(back, z)
    if n < z.shape[1]:
        first = "token 0 must pass unchanged, x_0 = z_0" if n == 0 else \
            f"the forward block with label y maps your x back to z for tokens 0..{n - 1} only"
        raise CheckFailed(f"{name}: {first}; {why}")


def check_guided_inverse(fn):
    """fn(z, f_cond, f_uncond, g, what, annealed) -> x: [B, T, D]; prints PASS or raises CheckFailed."""
    seed, labels, T, guidance = PROBLEMS[0]
    f_cond, f_uncond, pb = toy_branches(seed, labels, guidance.temperature)
    z = toy_noise(seed, len(labels))[:, :T]
    name = f"guided_inverse(z, f_cond, f_uncond, g=0.0, what='ab') for z of shape {list(z.shape)}"
    _maps_back(name, _inverse(fn, name, z, f_cond, f_uncond, 0.0, "ab", False), z, pb, labels,
               "with g = 0 guidance is off and x must be the plain conditional inverse")
    z = z[:, :7]            # a prefix, and g = 1: a wrong inverse here stays finite, so its message is this one
    name = f"guided_inverse(z, f_cond, f_cond, g=1.0, what='ab') for z of shape {list(z.shape)}"
    _maps_back(name, _inverse(fn, name, z, f_cond, f_cond, 1.0, "ab", False), z, pb, labels,
               "with f_uncond = f_cond the branches agree, so guidance changes nothing for any g: at step t "
               "both branches must read the same decoded tokens x_0..x_t (not z)")

    for seed, labels, T, guidance in PROBLEMS:
        f_cond, f_uncond, pb = toy_branches(seed, labels, guidance.temperature)
        z = toy_noise(seed, len(labels))[:, :T]
        name = (f"guided_inverse(z, f_cond, f_uncond, g={guidance.weight}, what='{guidance.what}', annealed="
                f"{guidance.annealed}) for z of shape {list(z.shape)}, labels {list(labels)}, "
                f"tau_u = {guidance.temperature}")
        x = _inverse(fn, name, z, f_cond, f_uncond, guidance.weight, guidance.what, guidance.annealed)
        want = block_inverse(pb, z, np.asarray(labels), TOY_CLASSES, guidance)
        n = first_wrong_token(x, want)
        if n == 0:
            raise CheckFailed(f"{name}: token 0 must pass unchanged, x_0 = z_0")
        if n < T:
            raise CheckFailed(f"{name}: tokens 0..{n - 1} match the reference, token {n} is off by "
                              f"{np.abs(x[:, n] - want[:, n]).max():.3g}: "
                              f"{_inverse_mistake(x, z, f_cond, f_uncond, guidance)}")
    passed("guided_inverse", "g = 0 and f_uncond = f_cond give the conditional inverse; matches the "
           "reference on 4 problems (T = 16, 7, 11, 16; what 'ab', 'a', 'b'; annealed on and off)")
