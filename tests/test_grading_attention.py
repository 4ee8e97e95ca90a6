"""The checks of assignment 01 (tarflow_ref/grading/attention.py): a correct solution built from the
package's reference functions passes, and each mistake the module docstring lists, written here as
a small wrong function, fails with a message that names it."""
import math

import numpy as np
import pytest

from tarflow_ref.attention import KVCache, attention_weights, softmax
from tarflow_ref.grading.attention import check_causal_attention, check_decode, check_softmax
from tarflow_ref.grading.report import CheckFailed


def causal_attention(q, k, v, start=0):
    """The reference answer: q: [H, n, d], k: [H, start+n, d], v: [H, start+n, e] -> [H, n, e]."""
    return attention_weights(q[None], k[None], start)[0] @ v


def list_decode(cache=None):
    """decode(q, k, v) with two Python lists as its cache; lists passed here outlive the calls (a mistake)."""
    def decode(q, k, v):
        keys, values = ([], []) if cache is None else cache
        outs = []
        for t in range(q.shape[1]):
            keys.append(k[:, t])
            values.append(v[:, t])
            outs.append(causal_attention(q[:, t:t + 1], np.stack(keys, 1), np.stack(values, 1), start=len(keys) - 1))
        return np.concatenate(outs, axis=1)                                    # [H, T, d]
    return decode


def decode_with(attend, write_first=True):
    """decode(q, k, v) that writes token t into a KVCache and attends with q_t via attend(q_t, K, V, t)."""
    def decode(q, k, v):
        heads, tokens, d = q.shape
        cache = KVCache(1, heads, tokens, d)
        outs = []
        for t in range(tokens):
            if write_first:
                cache.write(k[None, :, t:t + 1], v[None, :, t:t + 1], t)
            outs.append(attend(q[:, t:t + 1], cache.k[0, :, :t + 1], cache.v[0, :, :t + 1], t))
            if not write_first:                                                # the mistake: k_t, v_t too late
                cache.write(k[None, :, t:t + 1], v[None, :, t:t + 1], t)
        return np.concatenate(outs, axis=1)                                    # [H, T, d]
    return decode


def masked_attention(q, k, v, start=0, keep=lambda key, query: key <= query, scale=None, axis=-1, fill=-np.inf):
    """Attention with the parts a student writes made explicit, to get each one wrong in turn."""
    scale = math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ np.swapaxes(k, -1, -2) / scale                               # [H, n, s+n]
    query_pos = start + np.arange(q.shape[1])[:, None]
    scores = np.where(keep(np.arange(k.shape[1]), query_pos), scores, fill)
    return softmax(scores, axis=axis) @ v


def mixed_heads(q, k, v, start=0):
    """Softmax across the heads (axis 0), the mask applied afterwards: causal, but heads mix."""
    weights = softmax(q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1]), axis=0)     # [H, n, s+n]
    return weights * (np.arange(k.shape[1]) <= start + np.arange(q.shape[1])[:, None]) @ v


# ---- softmax -----------------------------------------------------------------------------------------

def test_softmax_reference_passes(capsys):
    check_softmax(softmax)
    assert capsys.readouterr().out.startswith("PASS softmax:")


def rows_normalised(e):
    """e divided by its sum along the last axis."""
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("wrong, match", [
    pytest.param(lambda s: rows_normalised(np.exp(s)), "exp\\(1000\\) overflows", id="no max subtracted"),
    pytest.param(lambda s: rows_normalised(np.exp(s - s.max())),
                 "each row's own maximum, not the maximum of the whole array", id="max of the whole array"),
    pytest.param(lambda s: rows_normalised(np.exp(s - s.max(-1))), "keepdims=True", id="max without keepdims"),
    pytest.param(lambda s: softmax(s, axis=0), "Every row must sum to 1", id="axis 0"),
    pytest.param(lambda s: np.exp(s - s.max()) / np.exp(s - s.max()).sum(), "Every row must sum to 1",
                 id="normalised over the whole array"),
    pytest.param(lambda s: softmax(np.clip(s, s.max(-1, keepdims=True) - 30, None)), "must get weight exactly 0",
                 id="scores clipped"),
    pytest.param(rows_normalised, "softmax after adding a constant to each row", id="no exp"),
])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")                           # the overflow being tested
def test_softmax_mistakes_are_named(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        check_softmax(wrong)


# ---- causal_attention ----------------------------------------------------------------------------------

def test_causal_attention_reference_passes(capsys):
    check_causal_attention(causal_attention)
    assert capsys.readouterr().out.startswith("PASS causal_attention:")


def attention_with(**mistake):
    """causal_attention(q, k, v, start) with one part of masked_attention changed."""
    return lambda q, k, v, start=0: masked_attention(q, k, v, start, **mistake)


@pytest.mark.parametrize("wrong, match", [
    pytest.param(attention_with(keep=lambda key, query: key >= 0),
                 "query 0 .* changed when only key/value 1 \\(a future position\\).*causal mask is missing",
                 id="no mask"),
    pytest.param(attention_with(keep=lambda key, query: key <= query + 1), "future position.*j <= start \\+ i",
                 id="one future key"),
    pytest.param(attention_with(keep=lambda key, query: key < query),
                 "entry \\(0, 0, 0\\) is nan.*every key masked", id="own key excluded"),
    pytest.param(attention_with(keep=lambda key, query: key < query, fill=-1e30),
                 "query 0 .*key/value 1 \\(a future position\\)", id="own key excluded, finite fill"),
    # the "fix" for the NaN above: key 0 always kept, the own key still excluded
    pytest.param(attention_with(keep=lambda key, query: (key < query) | (key == 0)),
                 "did not change when key/value 1 \\(its own position\\).*its own key",
                 id="own key excluded, key 0 kept"),
    pytest.param(lambda q, k, v, start=0: masked_attention(q, k, v, 0), "start=4.*earlier position.*`start` ignored",
                 id="start ignored"),
    pytest.param(attention_with(axis=-2), "changed when only query 0 changed.*not along the queries",
                 id="axis queries"),
    pytest.param(attention_with(axis=0), "is nan.*not taken along the keys axis", id="axis heads"),
    pytest.param(mixed_heads, "head 1 changed", id="heads mixed, mask after softmax"),
    pytest.param(attention_with(scale=1.0), "not divided by sqrt\\(d\\)", id="no scale"),
    pytest.param(lambda q, k, v, start=0: masked_attention(q, k, v, start, scale=q.shape[-1]), "divided by d instead",
                 id="scale 1/d"),
    pytest.param(lambda q, k, v, start=0: masked_attention(q, k, v, start, scale=math.sqrt(v.shape[-1])),
                 "e=6, start=2.*Compare with softmax", id="scale by the value width"),
])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_causal_attention_mistakes_are_named(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        check_causal_attention(wrong)


# ---- decode ------------------------------------------------------------------------------------------

def test_decode_reference_passes(capsys):
    check_decode(decode_with(causal_attention))
    assert capsys.readouterr().out.startswith("PASS decode:")


def test_decode_with_a_list_cache_passes():
    check_decode(list_decode())


def test_decode_attending_before_writing_is_named():
    with pytest.raises(CheckFailed, match="key/value 0 \\(its own position\\).*BEFORE attending"):
        check_decode(decode_with(causal_attention, write_first=False))


def test_decode_attending_to_all_keys_is_named():
    def decode(q, k, v):
        return np.concatenate([masked_attention(q[:, t:t + 1], k, v, t, keep=lambda key, query: key >= 0)
                               for t in range(q.shape[1])], axis=1)
    with pytest.raises(CheckFailed, match="a future position.*never to later tokens"):
        check_decode(decode)


def test_decode_cache_kept_between_calls_is_named():
    with pytest.raises(CheckFailed, match="called a second time.*Create the cache inside decode"):
        check_decode(list_decode(cache=([], [])))


def test_decode_scale_mistake_is_named():
    with pytest.raises(CheckFailed, match="decode with H=2.*not divided by sqrt\\(d\\)"):
        check_decode(decode_with(attention_with(scale=1.0)))


# ---- what every check does with a broken return value ------------------------------------------------

CHECKS = [(check_softmax, softmax), (check_causal_attention, causal_attention),
          (check_decode, decode_with(causal_attention))]


@pytest.mark.parametrize("check, good", CHECKS)
@pytest.mark.parametrize("broken, match", [
    (lambda out: None, "returned None"),
    (lambda out: out[..., :-1], "expected shape .*, got"),
    (lambda out: np.full_like(out, np.nan), "is nan \\(not finite\\)"),
])
def test_broken_returns_get_a_clear_message(check, good, broken, match):
    with pytest.raises(CheckFailed, match=match):
        check(lambda *args, **kwargs: broken(np.asarray(good(*args, **kwargs), dtype=float)))


@pytest.mark.parametrize("check", [check_softmax, check_causal_attention, check_decode])
def test_not_implemented_propagates(check):
    def student(*args, **kwargs):
        raise NotImplementedError()
    with pytest.raises(NotImplementedError):
        check(student)


@pytest.mark.parametrize("check, good", CHECKS)
def test_writing_into_an_input_is_named(check, good):
    def student(first, *rest):
        out = good(first.copy(), *rest)
        first *= 2.0
        return out
    with pytest.raises(CheckFailed, match="changed its argument (scores|q) in place"):
        check(student)
