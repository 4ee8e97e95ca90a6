"""Checks for assignment 02: the affine autoregressive flow block, its log-determinant and inverse.

Zhai et al. 2024, Sec. 2.1-2.2; book/checkpoints.md, "One flow block" and "Inverse, guidance and
sampling"; book/flow.md and book/likelihood.md, notebooks/03_affine_flow.ipynb and 04_logdet.ipynb
teach it. All arrays are NumPy float64, in the block's token order. f is a causal conditioner
(problems.toy_conditioner):
f(u: [B, n, D]) -> (a, m): [B, n, D], whose output at position t sees u_0..u_t only.

    shift(o):           o: [B, T, D] -> o',  o'_0 = 0,  o'_t = o_{t-1}
    flow_forward(u, f): a, m = shift(f(u));  z = (u - m) exp(-a);  logdet = -mean_{t,d} a_{t,d}
                        -> z: [B, T, D], logdet: [B]
    flow_inverse(z, f): u_0 = z_0,  u_{t+1} = z_{t+1} exp(a_t) + m_t,  (a_t, m_t) = f(u_0..u_t) at
                        position t  -> u: [B, T, D]

Since a_t, m_t depend on u_0..u_{t-1} only, J = dz/du (flattened token by token, [T D, T D]) is
block lower-triangular with diagonal blocks diag(exp(-a_t)), so logdet = log|det J| / (T D).

Each check compares with the package's reference (tarflow_ref.flow: shift on seeded arrays of
shapes [2, 5, 3], [3, 16, 2], [1, 7, 4]; block_forward and block_inverse with cfg = TOY,
reverse = False on the seeded toy block's first 16, 7 and 11 tokens, batches 2, 3 and 1: a causal
block cut to a prefix is again a flow block), and first tests properties that need no reference:
  check_shift:        a single 1 at token t comes out at token t + 1 of the same sample and value,
                      and a 1 at the last token leaves.
  check_flow_forward: the finite-difference Jacobian of the student's own flow_forward (one
                      sample, central differences): no z_t depends on a later u_s, dz_t/du_t is
                      diagonal, and logdet = log|det J| / (T D).
  check_flow_inverse: u_0 = z_0, and the reference forward maps the student's u back to z.

Mistakes each check is built to catch (tests/test_grading_flow.py writes each one):
  check_shift:        shifting the wrong way (o'_t = o_{t+1}); wrapping around (np.roll puts the
                      last token at token 0); shifting along the batch or value axis; writing
                      into the input o in place.
  check_flow_forward: logdet a sum instead of a mean (T D times too large); the wrong sign (of
                      logdet or in the exponent of z); the shift missing (a_t, m_t then see u_t,
                      so dz_t/du_t is not diagonal); a shift the wrong way or wrapping around (z_t
                      depends on a later token); one logdet for the whole batch; writing into
                      the input u in place.
  check_flow_inverse: one parallel pass with f(z) instead of the decoded prefix (one Jacobi step:
                      right for tokens 0 and 1 only); off by one token (u_t from the output at
                      position t, which moves token 0, or u_{t+1} from the output at position
                      t + 1); exp(-a) instead of exp(a); writing into the input z in place.
"""
import numpy as np
from einops import rearrange

from ..flow import block_forward, block_inverse, shift as reference_shift
from ..jacobi import affine_step
from .problems import TOY, toy_conditioner, toy_noise
from .report import CheckFailed, as_array, as_pair, call_unchanged, expect_close, first_wrong_token, hint, passed, same

# (seed, batch, tokens): the whole toy block, an odd prefix with a larger batch, a single sample.
# Seeds whose inverse of toy_noise stays bounded (|u| < 6): the random blocks of seeds 1-3 amplify
# standard normal noise until it overflows, correctly but useless for a check.
PROBLEMS = ((0, 2, 16), (5, 3, 7), (7, 1, 11))
# central differences with this step are accurate to ~1e-9 here: a derivative above DEPENDS is real
STEP, DEPENDS = 1e-5, 1e-6


def check_shift(fn):
    """fn(o: [B, T, D]) -> o': [B, T, D] (see the module docstring); prints PASS or raises CheckFailed."""
    shape = (2, 5, 3)
    tokens = shape[1]
    for t in [*range(1, tokens), 0]:       # token 0 last: a shift the wrong way shows first at token 1
        o = np.zeros(shape)
        o[0, t, 0] = 1.0
        name = f"shift(o) for o of shape {list(shape)} holding one 1 at (sample 0, token {t}, value 0)"
        got = as_array(name, call_unchanged(name, fn, o=o), shape)
        if not same(got, reference_shift(o)):
            raise CheckFailed(f"{name}: {impulse_mistake(got, t, tokens)}")
    rng = np.random.default_rng(0)
    for shape in [(2, 5, 3), (3, 16, 2), (1, 7, 4)]:
        o = rng.standard_normal(shape)
        name = f"shift(o) for o of shape {list(shape)}"
        expect_close(name, call_unchanged(name, fn, o=o), reference_shift(o))
    passed("shift", "o'_t = o_{t-1}, o'_0 = 0 along the token axis: a 1 at each token moves one token "
           "later, none wraps around; matches the reference on 3 arrays")


def impulse_mistake(got, t, tokens):
    """What a shift did wrong with a single 1 at (0, t, 0), in words."""
    hits = [tuple(int(i) for i in hit) for hit in np.argwhere(got != 0)]
    expected = "nowhere: the last token leaves" if t == tokens - 1 else f"at (0, {t + 1}, 0)"
    seen = f"it came out {f'at {hits}' if hits else 'nowhere'}, expected {expected}"
    if len(hits) == 1:
        sample, token, value = hits[0]
        if sample != 0 or value != 0:
            return f"{seen}: shift along axis 1 (tokens), not axis {0 if sample else 2}"
        if token == t - 1 or (t == 0 and token == tokens - 1):
            return f"{seen}: that shifts the wrong way; o'_t = o_(t-1) moves every token one LATER"
        if t == tokens - 1 and token == 0:
            return (f"{seen}: the last token wrapped around to token 0 (np.roll does this); token 0 "
                    "must be zero and the last token is dropped")
    return f"{seen}. o'_0 = 0 and o'_t = o_(t-1) along axis 1, the token axis"


def check_flow_forward(fn):
    """fn(u: [B, T, D], f) -> (z: [B, T, D], logdet: [B]); prints PASS or raises CheckFailed."""
    for i, (seed, batch, tokens) in enumerate(PROBLEMS):
        f, pb = toy_conditioner(seed)
        u = np.random.default_rng(seed).uniform(-1, 1, (batch, tokens, TOY.token_dim))
        name = f"flow_forward(u, f) for u of shape {list(u.shape)}"
        z, logdet = forward_pair(name, fn, u, f)
        z_ref, logdet_ref = block_forward(pb, u, None, TOY)
        if i == 0:
            check_jacobian(name, fn, u[0], f, logdet[0], logdet_ref[0])
        with hint("z = (u - m) exp(-a) with a, m the SHIFTED outputs of f(u)"):
            expect_close(f"{name}: z", z, z_ref)
        expect_close(f"{name}: logdet", logdet, logdet_ref)
    passed("flow_forward", "matches the reference on 3 inputs (16, 7, 11 tokens); dz/du is block "
           "lower-triangular with diagonal blocks, and logdet = log|det dz/du| / (T D)")


def forward_pair(name, fn, u, f):
    """(z, logdet) from fn(u, f), checked for type, shapes and finiteness."""
    return as_pair(name, call_unchanged(name, fn, u=u, f=f), ("z", "logdet (one value per sample)"),
                   (u.shape, u.shape[:1]))


def finite_difference_jacobian(flow_forward, u, f, step=STEP):
    """dz/du of one sample u: [T, D] by central differences -> J: [T D, T D], flattened token by
    token (row t D + d is z_{t,d}, column s D + k is u_{s,k}). The 2 T D shifted copies of u go
    through flow_forward(u, f) as one batch."""
    tokens, dim = u.shape
    steps = step * rearrange(np.eye(tokens * dim), "n (t d) -> n t d", t=tokens)     # [T D, T, D]
    both = np.concatenate([u + steps, u - steps])
    z, _ = forward_pair(f"flow_forward(u, f) for u of shape {list(both.shape)}", flow_forward, both, f)
    plus, minus = np.split(z, 2)
    return rearrange((plus - minus) / (2 * step), "n t d -> (t d) n")


def check_jacobian(name, fn, u, f, logdet, logdet_ref):
    """The structure of J = dz/du of fn for one sample u: [T, D] and logdet = log|det J| / (T D);
    logdet_ref, the reference's value, only names the mistake when they disagree."""
    tokens, dim = u.shape
    jac = finite_difference_jacobian(fn, u, f)
    blocks = np.abs(rearrange(jac, "(t d) (s k) -> t s d k", d=dim, k=dim))                # [T, T, D, D]
    later = np.triu(blocks.max(axis=(2, 3)) > DEPENDS, 1)
    if later.any():
        t, s = (int(i) for i in np.argwhere(later)[0])
        wrapped = " (wrapped around, as np.roll does)" if later[0, -1] else ""
        raise CheckFailed(f"{name}, sample 0: z_{t} changed when only u_{s} (a later token) changed"
                          f"{wrapped}, |dz_{t}/du_{s}| = {blocks[t, s].max():.3g}; token {t} may depend on "
                          f"tokens 0..{t} only: shift the conditioner's output one token later")
    own = blocks[np.arange(tokens), np.arange(tokens)] * (1 - np.eye(dim))                  # [T, D, D]
    if (own > DEPENDS).any():
        t, d, k = (int(i) for i in np.argwhere(own > DEPENDS)[0])
        source = f"come from tokens 0..{t - 1} only" if t else "be 0 (token 0 has no earlier tokens)"
        raise CheckFailed(f"{name}, sample 0: value {d} of z_{t} changed when only value {k} of u_{t} "
                          f"changed, |dz/du| = {own[t, d, k]:.3g}; a_{t} and m_{t} must {source}, so that "
                          f"dz_{t}/du_{t} = diag(exp(-a_{t})): is the shift missing?")
    _, log_abs_det = np.linalg.slogdet(jac)
    want = log_abs_det / (tokens * dim)
    if same(logdet, tokens * dim * logdet_ref):
        advice = "logdet is T D times too large: the released logdet is a MEAN over the T D values, not a sum"
    elif same(logdet, -logdet_ref):
        advice = "logdet has the wrong sign: dz_t/du_t = exp(-a_t), so logdet = -mean(a)"
    elif same(logdet, logdet_ref):
        advice = "logdet = -mean(a) is right, so z is not: z = (u - m) exp(-a), note the minus in the exponent"
    else:
        advice = "logdet = -mean of a over tokens and values, with a the SHIFTED log-scale"
    with hint(advice):
        expect_close(f"{name}, sample 0: logdet against log|det dz/du| / (T D) of your z by finite "
                     "differences", logdet, want, rtol=0.0, atol=DEPENDS)


def check_flow_inverse(fn):
    """fn(z: [B, T, D], f) -> u: [B, T, D], token by token; prints PASS or raises CheckFailed."""
    for seed, batch, tokens in PROBLEMS:
        f, pb = toy_conditioner(seed)
        z = toy_noise(seed, batch)[:, :tokens]
        name = f"flow_inverse(z, f) for z of shape {list(z.shape)}"
        u = as_array(name, call_unchanged(name, fn, z=z, f=f), z.shape)
        with hint("token 0 must pass unchanged, u_0 = z_0 (after the shift a_0 = m_0 = 0); token t + 1 "
                  "uses the conditioner's output at position t"):
            expect_close(f"{name}: token 0", u[:, 0], z[:, 0])
        back, _ = block_forward(pb, u, None, TOY)
        wrong = first_wrong_token(back, z)
        if wrong < tokens:
            raise CheckFailed(f"{name}: the forward block maps your u back to z for tokens 0..{wrong - 1} "
                              f"only; {inverse_mistake(u, z, f, wrong)}")
        expect_close(name, u, block_inverse(pb, z, None, TOY))
    passed("flow_inverse", "the forward block maps u back to z; matches the reference on 3 inputs "
           "(16, 7, 11 tokens)")


def inverse_mistake(u, z, f, t):
    """What an inverse did wrong when token t is its first that the forward does not map back, in words."""
    a, m = f(z)
    if same(u, affine_step(z, reference_shift(a), reference_shift(m), clamp=False)):
        return ("you computed every token from f(z) in one parallel pass (one Jacobi step, exact for tokens "
                "0 and 1 only). u_(t+1) needs a_t, m_t from the DECODED tokens u_0..u_t: call f on the "
                "prefix u[:, :t+1] inside the loop")
    if t == 1 and same(u[:, 1], affine_step(z[:, 1], -a[:, 0], m[:, 0], clamp=False)):
        return "token 1 used exp(-a): z = (u - m) exp(-a) solves to u = z exp(a) + m"
    return (f"token {t} is off. u_{t} = z_{t} exp(a_{t - 1}) + m_{t - 1}, with a_{t - 1}, m_{t - 1} the "
            f"output of f at position {t - 1} (the last position of the decoded prefix u_0..u_{t - 1})")
