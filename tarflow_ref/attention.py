"""Causal multi-head attention with a KV cache, and the transformer layer around it (NumPy).

Zhai et al. 2024, Sec. 2.2; book/checkpoints.md, "One flow block". With h: [B, n, C] the hidden states
of n consecutive tokens starting at position s:

    LN(h)     = (h - mean) / sqrt(var + 1e-5) * gamma + beta            (over the C axis)
    GELU(u)   = u * Phi(u) = u/2 * (1 + erf(u / sqrt 2))                 (the exact form)
    q, k, v   = LN(h) W_qkv^T + b,  split as [3, H, d] on the last axis   (queries, keys, values)
    A[i, j]   = softmax_j( q_i . k_j / (sqrt(d) * tau) ),  j <= s + i    (causal mask)
    Attn(h)   = concat_heads(A v) W_proj^T + b

A token attends only to itself and earlier tokens, so the keys and values of tokens already
seen never change: a KV cache stores them and a new token costs one row of attention instead
of a full recomputation. The cache here is pre-allocated for all T positions and written in
place, so the same code runs the full pass (s = 0, n = T), token-by-token decoding (n = 1) and
the blocks of tokens that GS-Jacobi solves at once.

The layer (pre-norm):  h <- h + Attn(LN1(h));   h <- h + W2 GELU(W1 LN2(h) + b1) + b2.
"""
import math

import numpy as np
from einops import rearrange
from scipy.special import erf

LN_EPS = 1e-5


def linear(x, weight, bias):
    """x: [..., in] @ weight[out, in]^T + bias[out] -> [..., out] (torch's convention)."""
    return x @ weight.T + bias


def standardize(x, eps=LN_EPS):
    """(x_hat, s): the last axis at zero mean and unit variance, x_hat = (x - mean) / s with
    s = sqrt(var + eps) (biased variance). layer_norm and its backward both start here."""
    mean = x.mean(-1, keepdims=True)
    s = np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    return (x - mean) / s, s


def layer_norm(x, weight, bias, eps=LN_EPS):
    """Normalise the last axis to zero mean and unit variance (biased), then scale and shift."""
    return standardize(x, eps)[0] * weight + bias


def normal_cdf(x):
    """Phi(x), the standard normal CDF (a Python float keeps float32 input float32)."""
    return 0.5 * (1.0 + erf(x / math.sqrt(2.0)))


def gelu(x):
    """The exact GELU, x * Phi(x), with Phi the standard normal CDF."""
    return x * normal_cdf(x)


def softmax(scores, axis=-1):
    shifted = scores - scores.max(axis=axis, keepdims=True)  # avoids overflow in exp
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


class KVCache:
    """Keys and values of every position seen so far, for one attention layer and one branch.

    k, v: [B, H, T, d], written in place at the positions of each call.
    """

    def __init__(self, batch, heads, tokens, head_dim, dtype=np.float64):
        self.k = np.zeros((batch, heads, tokens, head_dim), dtype)
        self.v = np.zeros((batch, heads, tokens, head_dim), dtype)

    def write(self, k, v, start):
        """Store k, v: [B, H, n, d] at positions start..start+n-1; return all keys and values
        of positions 0..start+n-1."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_attention(p, h, heads, start=0, cache=None, temperature=1.0):
    """Multi-head causal self-attention of n tokens at positions start..start+n-1.

    p: the layer's `attention.*` parameters; h: [B, n, C] (already layer-normed).
    Without a cache the call must start at 0 and sees only its own n tokens.
    Returns [B, n, C].
    """
    q, k, v = queries_keys_values(p, h, heads)                                     # each [B, H, n, d]
    if cache is not None:
        k, v = cache.write(k, v, start)                                            # [B, H, s+n, d]
    elif start != 0:
        raise ValueError("attention at a later position needs the cache of the earlier tokens")
    out = attention_weights(q, k, start, temperature) @ v                          # [B, H, n, d]
    out = rearrange(out, "b h n d -> b n (h d)")
    return linear(out, p["proj.weight"], p["proj.bias"])


def queries_keys_values(p, h, heads):
    """q, k, v: [B, H, n, d] from layer-normed h: [B, n, C]; the 3C outputs of the qkv layer are
    all query heads, then all key heads, then all value heads, each head's d values contiguous."""
    qkv = linear(h, p["qkv.weight"], p["qkv.bias"])                               # [B, n, 3C]
    return rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=heads)


def attention_weights(q, k, start=0, temperature=1.0):
    """A = softmax(q k^T / (sqrt(d) tau)) under the causal mask, so query i (at position start + i)
    sees keys 0..start+i only. q: [B, H, n, d], k: [B, H, s+n, d] -> A: [B, H, n, s+n]."""
    scores = q @ np.swapaxes(k, -1, -2) / (math.sqrt(q.shape[-1]) * temperature)
    query_pos = start + np.arange(q.shape[2])[:, None]
    key_pos = np.arange(k.shape[2])[None, :]
    return softmax(np.where(key_pos <= query_pos, scores, -np.inf))


def mlp(p, h):
    """The layer's feed-forward part on layer-normed h: [B, n, C] -> [B, n, C]."""
    return linear(gelu(linear(h, p["main.0.weight"], p["main.0.bias"])), p["main.2.weight"], p["main.2.bias"])


def transformer_layer(p, h, heads, start=0, cache=None, temperature=1.0):
    """One pre-norm layer; p holds the `attention.*` and `mlp.*` parameters of the layer."""
    att = sub_params(p, "attention.")
    h = h + causal_attention(att, layer_norm(h, att["norm.weight"], att["norm.bias"]),
                             heads, start, cache, temperature)
    ff = sub_params(p, "mlp.")
    return h + mlp(ff, layer_norm(h, ff["norm.weight"], ff["norm.bias"]))


def sub_params(params, prefix):
    """The entries of `params` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
