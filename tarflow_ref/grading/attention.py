"""Checks for assignment 01: a stable softmax, masked causal attention, and decoding with a KV cache.

Zhai et al. 2024, Sec. 2.2 (the causal transformer of a flow block); book/checkpoints.md, "One flow block", step 3;
book/attention.md and notebooks/02_causal_attention.ipynb teach it. All arrays are NumPy float64.

    softmax(s)_j = exp(s_j - max s) / sum_j' exp(s_j' - max s)            along the last axis
    causal_attention(q, k, v, start):  q: [H, n, d] at positions start..start+n-1,
        k: [H, start+n, d], v: [H, start+n, e]  ->  [H, n, e],
        out_i = sum_{j <= start+i} softmax_j(q_i . k_j / sqrt(d)) v_j
    decode(q, k, v):  q, k, v: [H, T, d] -> [H, T, d]; token t writes k_t, v_t into a cache and
        attends with q_t alone to the cached keys 0..t; it equals causal_attention(q, k, v, 0).

Each check compares with the package's reference (tarflow_ref.attention: softmax,
attention_weights) on seeded inputs of several sizes, and tests properties that need no reference:
rows of weights sum to 1; adding a constant to a row of scores changes nothing; a masked (-inf)
score gets weight exactly 0; an output depends on its own query, on the keys and values at
positions <= its own (its own one included) and on its own head only.

Mistakes each check is built to catch (tests/test_grading_attention.py writes each one):
  check_softmax:          exp without subtracting the maximum (overflow at scores near 1000);
                          the maximum of the whole array instead of each row's (0/0 in a row far
                          below the others); the max taken without keepdims (a shift that is not
                          per row); normalising over the wrong axis or the whole array; no exp at
                          all (scores / their sum); a masked (-inf) score that gets a nonzero
                          weight (scores clipped to a finite range).
  check_causal_attention: no mask, or a mask off by one either way (the query's own key excluded,
                          one future key included); `start` ignored; softmax over the queries
                          axis or over the heads; scores not divided by sqrt(d), or divided by d.
  check_decode:           attending before writing token t into the cache (q_t misses k_t, v_t);
                          attending to all T keys (the future leaks in); a cache kept between
                          calls; the same scale mistakes as above.
What no check can see: whether decode really goes token by token rather than calling
causal_attention once on everything (the outputs are the same; that is the point of the cache).
"""
import math

import numpy as np

from ..attention import attention_weights, softmax as reference_softmax
from .report import CheckFailed, as_array, call_many, call_unchanged, expect_close, hint, passed, same

# An output "changed" when it moved by more than this; masked keys move it by exactly 0 (their
# weight is exp(-inf) = 0), while the perturbations below move a visible key's output by 1e-2 or more.
MOVED = 1e-10


def check_softmax(fn):
    """fn(scores: [..., K]) -> [..., K], the softmax along the last axis; prints PASS or raises CheckFailed."""
    rng = np.random.default_rng(0)
    # [4, 4]: square, so a max without keepdims broadcasts silently instead of raising
    scores = 2.0 * rng.standard_normal((4, 4))
    got = as_array("softmax of a [4, 4] array", call_unchanged("softmax", fn, scores=scores), scores.shape)
    row_sums = got.sum(-1)
    with hint("Every row must sum to 1: normalise along the last axis (axis=-1), one row at a time"):
        expect_close("sum of each row of softmax", row_sums, np.ones_like(row_sums))
    shift = rng.uniform(-20.0, 20.0, (4, 1))                                       # one constant per row
    with hint("softmax(s + c) must equal softmax(s) for a constant c per row: subtract each row's own "
              "maximum (max along the last axis with keepdims=True)"):
        expect_close("softmax after adding a constant to each row",
                     call_unchanged("softmax", fn, scores=scores + shift), got)
    expect_close("softmax of a [4, 4] array", got, reference_softmax(scores))

    # [2, 3, 7] masked like attention scores (query i sees keys 0..4+i), then moved far from 0
    masked = np.where(np.arange(7) <= 4 + np.arange(3)[:, None], rng.standard_normal((2, 3, 7)), -np.inf)
    for what, scores, advice in [
            ("scores near 1000 (with -inf entries)", masked + 1000.0,
             "exp(1000) overflows: subtract each row's maximum before exp"),
            ("rows at levels -1000, 0 and 1000 (with -inf entries)", masked + [[-1000.0], [0.0], [1000.0]],
             "A row far below the others must still work: subtract each row's own maximum, not the "
             "maximum of the whole array (then exp underflows to 0/0 in the low row)")]:
        with hint(advice):
            got = as_array(f"softmax of {what}", call_unchanged("softmax", fn, scores=scores), scores.shape)
        hidden = np.isneginf(scores)
        if (got[hidden] != 0).any():
            index = tuple(int(i) for i in np.argwhere(hidden & (got != 0))[0])
            raise CheckFailed(f"softmax of {what}: entry {index} has score -inf but weight {got[index]:.3g}; "
                              "a masked (-inf) score must get weight exactly 0 (exp(-inf) = 0; do not clip "
                              "or replace -inf)")
        expect_close(f"softmax of {what}", got, reference_softmax(scores))
    passed("softmax", "matches the reference on 3 inputs; rows sum to 1, a constant per row changes nothing, "
           "scores near +-1000 work and -inf gets weight 0")


def check_causal_attention(fn):
    """fn(q, k, v, start) -> [H, n, e] (see the module docstring); prints PASS or raises CheckFailed."""
    rng = np.random.default_rng(1)
    # (H, n, d, e, start): the full pass; a later chunk of an odd length; values wider than queries
    for heads, n, d, e, start in [(2, 5, 4, 4, 0), (3, 3, 8, 8, 4), (2, 7, 4, 6, 2)]:
        q = rng.standard_normal((heads, n, d))
        k = rng.standard_normal((heads, start + n, d))
        v = rng.standard_normal((heads, start + n, e))
        name = f"causal_attention with H={heads}, n={n}, d={d}, e={e}, start={start}"

        def call_all(inputs, name=name, start=start):
            return call_many(name, fn, [dict(q=q, k=k, v=v, start=start) for q, k, v in inputs])
        got = check_dependence(name, call_all, q, k, v, start,
                               own="a query must see its own key (keep key j for j <= start + i, not j < start + i)",
                               earlier="query i sits at position start + i and must see every key 0..start+i"
                                       + ("; is `start` ignored?" if start else ""),
                               future="the causal mask is missing or lets a query see a future key "
                                      "(keep key j only for j <= start + i)")
        expect_attention(name, got, q, k, v, start)
    passed("causal_attention", "matches the reference on 3 inputs (start 0, 4, 2; n odd too); causal, "
           "own key seen, queries and heads independent")


def check_decode(fn):
    """fn(q, k, v) -> [H, T, d], one token at a time with a KV cache; prints PASS or raises CheckFailed."""
    rng = np.random.default_rng(2)
    for heads, tokens, d in [(2, 5, 4), (3, 7, 8)]:
        q, k, v = rng.standard_normal((3, heads, tokens, d))
        name = f"decode with H={heads}, T={tokens}, d={d}"

        def call_all(inputs, name=name):
            return call_many(name, fn, [dict(q=q, k=k, v=v) for q, k, v in inputs])
        first, second = call_all([(q, k, v), (q, k, v)])
        first = as_array(name, first, q.shape)
        with hint("Create the cache inside decode, so that each call starts with an empty one"):
            expect_close(f"{name}, called a second time on the same q, k, v", second, first)
        check_dependence(name, call_all, q, k, v, 0,
                         own="write token t's key and value into the cache BEFORE attending with q_t",
                         earlier="query t must attend to every cached key 0..t",
                         future="query t must attend only to the cached keys 0..t, never to later tokens")
        expect_attention(name, first, q, k, v, 0)
    passed("decode", "token by token equals causal attention over all T at once (T = 5, 7); "
           "no output depends on a later token")


def expect_attention(name, got, q, k, v, start):
    """got == softmax(q k^T / sqrt(d), causal mask) v, the reference; a miss that matches a known
    wrong scale says so. Returns got as an array."""
    got = as_array(name, got, q.shape[:2] + v.shape[2:])
    d = q.shape[-1]
    # attention_weights divides the scores by sqrt(d) * temperature, so a temperature undoes the scale
    for temperature, mistake in [(1.0 / math.sqrt(d), "the scores q.k are not divided by sqrt(d)"),
                                 (math.sqrt(d), "the scores q.k are divided by d instead of sqrt(d)")]:
        if same(got, attention_weights(q[None], k[None], start, temperature)[0] @ v):
            raise CheckFailed(f"{name}: {mistake}")
    with hint("Compare with softmax(q k^T / sqrt(d)) under the causal mask, times v (d: the width of q and k)"):
        return expect_close(name, got, attention_weights(q[None], k[None], start)[0] @ v)


def check_dependence(name, call_all, q, k, v, start, own, earlier, future):
    """What each output may depend on, tested by changing one input at a time (no reference needed).

    q: [H, n, d] at positions start..start+n-1, k, v: [H, start+n, .]; call_all([(q, k, v), ...]) ->
    [H, n, e] for each (one batch: the inputs are drawn first, then all calls go at once).
    Changing key and value j must leave the queries at positions < j unchanged (else the hint
    `future`) and change every query at a position >= j (else `own` for the query at position j,
    `earlier` for later ones); changing query i, or head 0, must move nothing else.
    Returns the output for (q, k, v) as an array.
    """
    rng = np.random.default_rng(3)
    n = q.shape[1]
    positions = start + np.arange(n)                                                       # [n]
    inputs = [(q, k, v)]
    for j in range(start + n):                                                             # key/value j moved
        k2, v2 = k.copy(), v.copy()
        k2[:, j] += rng.standard_normal(k.shape[::2])
        v2[:, j] += rng.standard_normal(v.shape[::2])
        inputs.append((q, k2, v2))
    for i in range(n):                                                                     # query i moved
        q2 = q.copy()
        q2[:, i] += rng.standard_normal(q.shape[::2])
        inputs.append((q2, k, v))
    q2, k2, v2 = q.copy(), k.copy(), v.copy()                                              # head 0 moved
    for x in (q2, k2, v2):
        x[0] += rng.standard_normal(x.shape[1:])
    inputs.append((q2, k2, v2))
    with hint("A NaN or inf often means a query's row of scores is all -inf (every key masked, "
              "the query's own one too) or the softmax is not taken along the keys axis"):
        outputs = call_all(inputs)
        base = as_array(name, outputs[0], q.shape[:2] + v.shape[2:])
    # [H, n] per moved input: whether each output moved
    moved = iter(np.abs(as_array(name, out, base.shape) - base).max(-1) > MOVED for out in outputs[1:])

    for j in range(start + n):
        change = next(moved).any(0)                                                        # [n]
        for i in np.flatnonzero(change & (positions < j)):
            raise CheckFailed(f"{name}: the output at query {i} (position {positions[i]}) changed when only "
                              f"key/value {j} (a future position) changed: {future}")
        for i in np.flatnonzero(~change & (positions >= j)):
            where, advice = ("its own position", own) if positions[i] == j else ("an earlier position", earlier)
            raise CheckFailed(f"{name}: the output at query {i} (position {positions[i]}) did not change when "
                              f"key/value {j} ({where}) changed: {advice}")
    for i in range(n):
        for other in np.flatnonzero(next(moved).any(0) & (np.arange(n) != i)):
            raise CheckFailed(f"{name}: the output at query {other} changed when only query {i} changed: "
                              "each query's weights are a softmax of its own scores along the keys "
                              "(the last axis), not along the queries")
    if next(moved)[1:].any():
        raise CheckFailed(f"{name}: the output of head 1 changed when only head 0's q, k, v changed: heads are "
                          "independent (the softmax runs along the keys, never across heads)")
    return base
