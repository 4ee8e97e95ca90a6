"""Layer norm, GELU, causal multi-head attention and the KV cache (book/checkpoints.md, "One flow block"),
against hand computations and torch.nn.functional, NumPy and torch."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tarflow_ref.attention import KVCache, causal_attention, gelu, layer_norm, softmax, sub_params, transformer_layer
from tarflow_ref.torch_backend.engine import KVCache as TorchKVCache

from conftest import SMALL_CONFIGS, make_model

CFG = SMALL_CONFIGS["cond-even-P2"]          # C = 32, H = 4 heads of d = 8
CHUNKS = [3, 1, 5, 2, 1, 4]                   # GS-Jacobi-like chunk sizes summing to n = 16


@pytest.fixture(scope="module")
def layer():
    """(NumPy params of one transformer layer, the same torch AttentionBlock), weights away from init."""
    model, params = make_model(CFG, seed=7)
    return sub_params(params, "blocks.1.attn_blocks.1."), model.blocks[1].attn_blocks[1]


def hidden(n=16, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, n, CFG.width))


def attention_by_loops(p, h, heads, temperature=1.0):
    """Independent reference: one head and one query at a time, the [3, H, d] split by index arithmetic."""
    B, n, C = h.shape
    d = C // heads
    qkv = h @ p["qkv.weight"].T + p["qkv.bias"]
    out = np.zeros((B, n, C))
    for b in range(B):
        for head in range(heads):
            q, k, v = (qkv[b, :, part * C + head * d: part * C + (head + 1) * d] for part in range(3))
            for i in range(n):
                scores = np.array([q[i] @ k[j] for j in range(i + 1)]) / (math.sqrt(d) * temperature)
                w = np.exp(scores - scores.max())
                out[b, i, head * d:(head + 1) * d] = (w / w.sum()) @ v[:i + 1]
    return out @ p["proj.weight"].T + p["proj.bias"]


def test_layer_norm_matches_torch():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(2, 5, 32))
    w, b = np.random.default_rng(2).normal(size=(2, 32))
    ref = F.layer_norm(torch.from_numpy(x), (32,), torch.from_numpy(w), torch.from_numpy(b), eps=1e-5)
    np.testing.assert_allclose(layer_norm(x, w, b), ref.numpy(), rtol=1e-13, atol=1e-13)
    # a hand case: [1, 3] has mean 2 and biased variance 1
    np.testing.assert_allclose(layer_norm(np.array([1.0, 3.0]), 1.0, 0.0), np.array([-1, 1]) / math.sqrt(1 + 1e-5))


def test_gelu_is_the_exact_erf_form():
    x = np.linspace(-6, 6, 101)
    np.testing.assert_allclose(gelu(x), F.gelu(torch.from_numpy(x), approximate="none").numpy(), rtol=1e-14, atol=1e-15)
    assert gelu(np.array(1.0)) == pytest.approx(0.8413447460685429, abs=1e-15)   # 1 * Phi(1)
    # the tanh approximation differs by ~1e-4: the test tells the two forms apart
    assert abs(gelu(np.array(1.0)) - F.gelu(torch.tensor(1.0, dtype=torch.float64), approximate="tanh").item()) > 1e-5


def test_softmax_matches_torch_and_survives_large_scores():
    s = np.random.default_rng(3).normal(size=(3, 7)) * 5
    np.testing.assert_allclose(softmax(s), torch.softmax(torch.from_numpy(s), -1).numpy(), rtol=1e-14)
    np.testing.assert_allclose(softmax(np.array([1000.0, 1000.0, -np.inf])), [0.5, 0.5, 0.0])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_causal_attention_matches_a_per_head_loop(layer, temperature):
    p, _ = layer
    att = sub_params(p, "attention.")
    h = hidden(n=6)
    np.testing.assert_allclose(causal_attention(att, h, CFG.heads, temperature=temperature),
                               attention_by_loops(att, h, CFG.heads, temperature), rtol=1e-12, atol=1e-12)


def test_attention_is_causal(layer):
    p, _ = layer
    att = sub_params(p, "attention.")
    h = hidden()
    changed = h.copy()
    changed[:, 9] += 1.0
    before, after = causal_attention(att, h, CFG.heads), causal_attention(att, changed, CFG.heads)
    np.testing.assert_array_equal(before[:, :9], after[:, :9])
    assert np.abs(before[:, 9:] - after[:, 9:]).min() > 0


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_numpy_attention_and_layer_match_torch(layer, temperature):
    p, block = layer
    h = hidden()
    th = torch.from_numpy(h)
    att = sub_params(p, "attention.")
    ln = layer_norm(h, att["norm.weight"], att["norm.bias"])
    with torch.no_grad():
        np.testing.assert_allclose(causal_attention(att, ln, CFG.heads, temperature=temperature),
                                   block.attention(th, temperature=temperature).numpy(), rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(transformer_layer(p, h, CFG.heads, temperature=temperature),
                                   block(th, temperature=temperature).numpy(), rtol=1e-11, atol=1e-12)


def test_attention_bias_is_the_additive_causal_mask(layer):
    """attention_bias (engine.py): 0 where allowed, -inf elsewhere, in the queries' dtype; the engine's
    attention with it gives the layer's own causal attention."""
    from tarflow_ref.torch_backend.engine import attend, attention_bias
    _, block = layer
    th = torch.from_numpy(hidden())
    allowed = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    bias = attention_bias(allowed, th)
    assert bias.dtype == torch.float64 and torch.equal(bias == 0, allowed) and torch.isinf(bias[~allowed]).all()
    with torch.no_grad():
        assert torch.equal(attend(block.attention, th, 0, TorchKVCache(16), 1.0, bias, None), block.attention(th))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_bias(allowed, th.float()).dtype == torch.bfloat16     # what autocast's queries have
        assert attention_bias(allowed, th).dtype == torch.float64               # autocast leaves float64 alone


@pytest.mark.parametrize("chunks", [[1] * 16, CHUNKS], ids=["token-by-token", "chunks"])
def test_numpy_kv_cache_decoding_equals_the_full_pass(layer, chunks):
    p, _ = layer
    h = hidden()
    full = transformer_layer(p, h, CFG.heads)
    cache = KVCache(len(h), CFG.heads, 16, CFG.head_dim)
    parts, start = [], 0
    for n in chunks:
        parts.append(transformer_layer(p, h[:, start:start + n], CFG.heads, start, cache))
        start += n
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunks", [[1] * 16, CHUNKS], ids=["token-by-token", "chunks"])
def test_torch_kv_cache_decoding_equals_the_masked_full_pass(layer, chunks):
    _, block = layer
    h = torch.from_numpy(hidden())
    cache = TorchKVCache(16)
    with torch.no_grad():
        full = block(h)
        parts, start = [], 0
        for n in chunks:
            parts.append(block(h[:, start:start + n], start, cache))
            start += n
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-12, atol=1e-12)


def test_a_later_position_without_a_cache_is_refused(layer):
    p, block = layer
    h = hidden(n=2)
    with pytest.raises(ValueError, match="needs the cache of the earlier tokens"):
        causal_attention(sub_params(p, "attention."), h, CFG.heads, start=3)
    with pytest.raises(ValueError, match="needs the cache of the earlier tokens"):
        block.attention(torch.from_numpy(h), start=3)
