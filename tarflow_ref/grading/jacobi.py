"""Checks of assignment 03: Jacobi and GS-Jacobi inversion of one flow block (Liu & Qin 2025,
Sec. 3-4; book/jacobi.md; notebooks/08_jacobi.ipynb; book/checkpoints.md, "GS-Jacobi strategies").

In the block's token order, with z: [B, T, D] the block's output and (a, m) = f(x): [B, T, D] the
raw conditioner output (position t is computed from x_0..x_t and parametrises token t + 1):

    one Jacobi iteration   F(x)_0 = z_0,   F(x)_{t+1} = z_{t+1} exp(a_t(x)) + m_t(x)
    Jacobi                 x^0 = z,  x^{k+1} = F(x^k): tokens 0..k of x^k are exact (the causal
                           staircase), so x^{T-1} is the exact inverse
    GS-Jacobi              G modules [s, e) of M = T / G tokens, in turn: x_s = F(x)_s from the
                           finished tokens, then `iterations` times x_{s+1..e-1} = F(x)_{s+1..e-1};
                           G = T is the sequential sampler, G = 1 plain Jacobi

The student's functions (NumPy, float64) run on toy blocks from grading.problems (T = 16 tokens of
D = 2, and the prefixes of 9 and 15 tokens, which a causal block inverts on their own) and are
compared with jacobi.block_inverse_gsj (KV cache, x^0 = z, no early stop, no clamp) and the
sequential flow.block_inverse. A right answer agrees with them to ~1e-14 (worst measured: 4e-15
over every G and J of these problems); one Jacobi iteration more or less already moves the result by
1e-3 or more (measured), so expect_close's tolerance (1e-8 relative + 1e-10) separates right from
wrong with room on both sides.

Mistakes each check is designed to catch:

check_jacobi_update        token 0 not z_0 (x_0 kept, zeros, np.roll wrapping a_{T-1} around);
                           no shift by one token (a_{t+1} for token t+1) or x_{t+1} in place of
                           z_{t+1} (either makes F_{t+1} depend on x_{t+1}: the causality check);
                           the forward formula (z - m) exp(-a), f(z) in place of f(x) (both break
                           F(x*) = x* at the exact inverse x*); token-by-token updates inside one
                           iteration (then F(x) ignores x: only the package's F(x) tells)
check_jacobi_inverse       one iteration too few or too many; starting from zeros; updating tokens
                           in place within an iteration (Gauss-Seidel: more tokens exact than
                           Jacobi can give); the staircase and T - 1 iterations = exact inverse
check_gs_jacobi_inverse    the first token of a module never set (G = T must be the sequential
                           sampler for any number of iterations); modules of G tokens instead of
                           G modules; iterations that touch tokens outside the module
every check                None, a wrong shape, NaN or inf; an input array changed in place
"""
import numpy as np

from ..flow import block_inverse, conditioner, shift
from ..jacobi import affine_step, block_inverse_gsj
from ..strategy import BlockPlan
from .problems import TOY, toy_conditioner, toy_noise
from .report import CheckFailed, as_array, call_many, expect_close, first_wrong_token, hint, passed

# (conditioner seed, noise seed, B, T): the exact inverse and every Jacobi / GS-Jacobi iterate of
# these stay below 5 in size, so a student's solver needs no guard against overflow
PROBLEMS = ((0, 0, 2, 16), (6, 1, 3, 9), (7, 4, 1, 15))
# (modules, iterations) per T; (4, 5) runs more iterations than a module of 4 tokens needs
SPLITS = {16: ((4, 1), (2, 3), (8, 1), (1, 2), (4, 5)), 9: ((3, 1), (3, 2)), 15: ((5, 1), (3, 2))}


def _problem(seed, noise_seed, batch, tokens):
    """(f, pb, z: [B, T, D]): a toy block and noise for its first T tokens."""
    f, pb = toy_conditioner(seed)
    return f, pb, toy_noise(noise_seed, batch)[:, :tokens]


def _solver(pb, z, modules, iterations):
    """The package's GS-Jacobi inverse in the block order (0 iterations: x^0 = z)."""
    if iterations == 0:
        return z.copy()
    return block_inverse_gsj(pb, z, None, TOY, BlockPlan(modules, iterations))


def _count(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def _off_by(got, want, t):
    return f"{np.abs(got[:, t] - want[:, t]).max():.3g}"


def _expect(label, got, want, advice):
    """expect_close with advice in the student's terms appended to its message."""
    with hint(advice):
        expect_close(label, got, want)


def check_jacobi_update(jacobi_update):
    """jacobi_update(x, z, f) -> F(x): [B, T, D], one Jacobi iteration. PASS line or CheckFailed."""
    for n, (seed, noise_seed, B, T) in enumerate(PROBLEMS):
        f, pb, z = _problem(seed, noise_seed, B, T)
        x = np.random.default_rng(100 + n).standard_normal(z.shape)    # an iterate unlike z
        label = f"jacobi_update(x, z, f) on B={B}, T={T}"
        j = T // 2                                  # move one token; F_0..F_j must not notice
        moved = x.copy()
        moved[:, j] += 1.0
        exact = block_inverse(pb, z, None, TOY)
        at_exact = f"jacobi_update(x*, z, f) at the exact inverse x*, B={B}, T={T}"
        F, F_moved, F_exact = call_many(label, jacobi_update, [dict(x=x, z=z, f=f), dict(x=moved, z=z, f=f),
                                                               dict(x=exact, z=z, f=f)])
        F = as_array(label, F, z.shape)
        if first_wrong_token(F[:, :1], z[:, :1]) == 0:
            kept_x = " (it is x_0)" if first_wrong_token(F[:, :1], x[:, :1]) == 1 else ""
            raise CheckFailed(f"{label}: token 0 must pass unchanged, F(x)_0 = z_0, but it is off by "
                              f"{_off_by(F, z, 0)}{kept_x}")

        F_moved = as_array(label, F_moved, z.shape)
        t = first_wrong_token(F_moved[:, :j + 1], F[:, :j + 1])
        if t <= j:
            later = "" if t == j else " (a later token)"
            raise CheckFailed(f"{label}: token {t} of F(x) changed when only x_{j} changed{later}; token t + 1 may "
                              f"depend on x_0..x_t only: F(x)_(t+1) = z_(t+1) exp(a_t) + m_t takes a_t, m_t, the "
                              f"output of f at position t (the shift by one token: a[:, t], not a[:, t + 1]), "
                              f"and z_(t+1), not x_(t+1)")

        _expect(at_exact, as_array(at_exact, F_exact, z.shape), exact,
                "the exact inverse must be a fixed point, F(x*) = x*: F(x)_(t+1) = z_(t+1) exp(a_t) + m_t with "
                "(a, m) = f(x) of the given x, times exp(+a_t) (exp(-a) is the forward direction)")

        a, m = conditioner(pb, x, None, TOY)
        _expect(label, F, affine_step(z, shift(a), shift(m), clamp=False),
                "F(x) is computed from the given x with one call of f, all tokens at once (no token-by-token "
                "updates inside one iteration)")
    passed("jacobi_update", "F(x)_0 = z_0, token t + 1 depends on tokens 0..t only, the exact inverse is a "
                            "fixed point, and it equals the package's F(x) (3 toy blocks, T = 16, 9, 15)")


def check_jacobi_inverse(jacobi_inverse):
    """jacobi_inverse(z, f, iterations) -> x^k: [B, T, D] from x^0 = z. PASS line or CheckFailed."""
    for seed, noise_seed, B, T in PROBLEMS:
        f, pb, z = _problem(seed, noise_seed, B, T)
        exact = block_inverse(pb, z, None, TOY)
        counts = (1, 2, 5, T - 1)
        # one batch; an argument changed in place shows at the first call, so it carries that call's name
        results = call_many(f"jacobi_inverse(z, f, {counts[0]}) on B={B}, T={T}", jacobi_inverse,
                            [dict(z=z, f=f, iterations=k) for k in counts])
        for k, x in zip(counts, results):
            label = f"jacobi_inverse(z, f, {k}) on B={B}, T={T}"
            x = as_array(label, x, z.shape)
            n = first_wrong_token(x, exact)
            if n < k + 1:
                advice = (f"it equals {_count(k - 1, 'iteration')}: the loop runs one iteration too few"
                        if first_wrong_token(x, _solver(pb, z, 1, k - 1)) == T
                        else "start from x^0 = z (token 0 exact from the start) and repeat x <- F(x)")
                raise CheckFailed(f"{label}: after {_count(k, 'iteration')} tokens 0..{k} must equal the exact "
                                  f"inverse (the causal staircase), but token {n} is off by {_off_by(x, exact, n)}; "
                                  f"{advice}")
            want = _solver(pb, z, 1, k)
            if first_wrong_token(x, want) == T:
                continue
            if first_wrong_token(x, _solver(pb, z, 1, k + 1)) == T:
                advice = f"it equals {_count(k + 1, 'iteration')}: the loop runs one iteration too many"
            elif n > first_wrong_token(want, exact):
                advice = (f"tokens 0..{n - 1} are exact already, more than {_count(k, 'Jacobi iteration')} can "
                        f"give: values updated within an iteration were used for later tokens (updating x in "
                        f"place, token by token, is Gauss-Seidel, i.e. the sequential sampler); Jacobi computes "
                        f"all of x^(k+1) = F(x^k) from x^k, with one call of f")
            else:
                advice = "each iteration is x <- F(x) (your jacobi_update), starting from x^0 = z"
            _expect(label, x, want, advice)
    passed("jacobi_inverse", "after k iterations tokens 0..k are exact, T - 1 iterations give the exact inverse, "
                             "and it equals the package's Jacobi solver for k = 1, 2, 5, T - 1 (3 toy blocks)")


def _gs_hint(x, pb, z, modules, iterations, n):
    """What the first wrong token n of a GS-Jacobi result says, in the terms of the algorithm."""
    T = z.shape[1]
    M = T // modules
    s = n // M * M
    if M != modules and first_wrong_token(x, _solver(pb, z, M, iterations)) == T:
        return (f"it equals {_count(M, 'module')} of {modules} tokens: cut the T = {T} tokens into {modules} "
                f"modules of T / {modules} = {_count(M, 'token')}")
    if M == 1:
        return (f"module {n} is token {n} alone: x_{n} = F(x)_{n} = z_{n} exp(a_{n - 1}) + m_{n - 1}, computed "
                f"from the finished modules before the module's iterations (which have nothing left to update)")
    return (f"module {n // M} holds tokens {s}..{s + M - 1}: first x_{s} = F(x)_{s} from the finished tokens, then "
            f"{_count(iterations, 'iteration')} x <- F(x) on tokens {s + 1}..{s + M - 1} only, all at once")


def check_gs_jacobi_inverse(gs_jacobi_inverse):
    """gs_jacobi_inverse(z, f, modules, iterations) -> x: [B, T, D]. PASS line or CheckFailed."""
    for seed, noise_seed, B, T in PROBLEMS:
        f, pb, z = _problem(seed, noise_seed, B, T)
        exact = block_inverse(pb, z, None, TOY)
        splits = ((T, 1), (T, 3)) + SPLITS[T]
        results = call_many(f"gs_jacobi_inverse(z, f, modules={splits[0][0]}, iterations={splits[0][1]}) on B={B}, "
                            f"T={T}", gs_jacobi_inverse,
                            [dict(z=z, f=f, modules=G, iterations=J) for G, J in splits])
        for (G, J), x in zip(splits, results):
            label = f"gs_jacobi_inverse(z, f, modules={G}, iterations={J}) on B={B}, T={T}"
            x = as_array(label, x, z.shape)
            if G == T:                  # one token per module: the sequential sampler, whatever J
                want, what = exact, "the exact inverse (one token per module is the sequential sampler)"
            else:
                want, what = _solver(pb, z, G, J), "the package's GS-Jacobi"
            n = first_wrong_token(x, want)
            if n < T:
                raise CheckFailed(f"{label}: token {n} is off by {_off_by(x, want, n)} from {what}; "
                                  f"{_gs_hint(x, pb, z, G, J, n)}")
    passed("gs_jacobi_inverse", "one token per module gives the exact inverse, and it equals the package's "
                                "GS-Jacobi (KV cache) for 1 to 8 modules and 1 to 5 iterations (3 toy blocks)")
