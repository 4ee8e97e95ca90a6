"""The affine autoregressive flow block (book/checkpoints.md, "One flow block", "Inverse, guidance and
sampling"), its labels and guidance.

Properties: inverse(forward(x)) = x; KV-cache decoding of the conditioner equals the masked full
pass; one block's Jacobian is lower-triangular over tokens in the block's order with diagonal
blocks exp(-a_t); labels y < 0 / None use the mean class embedding; guidance arithmetic and the
annealing schedule g_t = g (t + 1) / (T - 1); the cached, guided inverse equals a brute-force one.
"""
import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from tarflow_ref import Guidance, model as np_model
from tarflow_ref.flow import (
    Block,
    block,
    block_forward,
    block_inverse,
    blocks,
    class_embedding,
    conditioner,
    new_caches,
    permute,
    reverses,
    shift,
)
from tarflow_ref.guidance import guide, guided
from tarflow_ref.patchify import patchify
from tarflow_ref.torch_backend.engine import guided_conditioner, new_caches as torch_new_caches
from tarflow_ref.torch_backend.sampling import inverse as torch_inverse
from tarflow_ref.validation import check_labels

from conftest import SMALL_CONFIGS, make_model

CHUNKS = [1, 3, 2, 5, 1, 4]          # sums to T = 16 of "cond-even-P2"


def labels_for(cfg, batch):
    """Labels with a negative entry (no label) for conditional models, None otherwise."""
    if not cfg.conditional:
        return None
    return np.array([(i * 5) % cfg.num_classes if i % 3 else -1 for i in range(batch)])


def tokens(cfg, batch, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, cfg.tokens, cfg.token_dim))


def test_numpy_inverse_of_forward(small, rng):
    _, cfg, _, params = small
    x = rng.uniform(-1, 1, size=(3, cfg.channels, cfg.image_size, cfg.image_size))
    y = labels_for(cfg, 3)
    z, _ = np_model.forward(params, cfg, x, y)
    assert np.abs(z - patchify(x, cfg.patch_size)).max() > 0.1        # the flow is far from the identity
    np.testing.assert_allclose(np_model.inverse(params, cfg, z, y), patchify(x, cfg.patch_size), rtol=0, atol=1e-9)


def test_torch_inverse_of_forward(small, rng):
    _, cfg, model, _ = small
    x = torch.from_numpy(rng.uniform(-1, 1, size=(3, cfg.channels, cfg.image_size, cfg.image_size)))
    y = None if labels_for(cfg, 3) is None else torch.from_numpy(labels_for(cfg, 3))
    with torch.no_grad():
        z, _ = model(x, y)
    torch.testing.assert_close(torch_inverse(model, z, y), patchify(x, cfg.patch_size), rtol=0, atol=1e-9)


@pytest.mark.parametrize("b", [0, 1])
@pytest.mark.parametrize("chunks", [[1] * 16, CHUNKS], ids=["token-by-token", "chunks"])
def test_conditioner_kv_cache_equals_the_full_pass(b, chunks):
    cfg = SMALL_CONFIGS["cond-even-P2"]
    model, params = make_model(cfg, seed=3)
    blk, torch_block = block(params, b), model.blocks[b]
    u, y = tokens(cfg, 2), np.array([3, -1])
    full_a, full_m = conditioner(blk, u, y, cfg)
    tu, ty = torch.from_numpy(u), torch.from_numpy(y)
    caches, torch_caches = new_caches(cfg, 2), torch_new_caches(torch_block, cfg.tokens)
    start = 0
    with torch.no_grad():
        torch_full = torch_block.conditioner(tu, ty)
        for n in chunks:
            a, m = conditioner(blk, u[:, start:start + n], y, cfg, start, caches)
            np.testing.assert_allclose(a, full_a[:, start:start + n], rtol=1e-11, atol=1e-12)
            np.testing.assert_allclose(m, full_m[:, start:start + n], rtol=1e-11, atol=1e-12)
            ta, tm = guided_conditioner(torch_block, tu[:, start:start + n], ty, start, torch_caches, None)
            torch.testing.assert_close(ta, torch_full[0][:, start:start + n], rtol=1e-11, atol=1e-12)
            torch.testing.assert_close(tm, torch_full[1][:, start:start + n], rtol=1e-11, atol=1e-12)
            start += n


@pytest.mark.parametrize("b", [0, 1])
def test_block_jacobian_is_lower_triangular_in_block_order(b):
    cfg = SMALL_CONFIGS["cond-even-P2"].replace(image_size=4)           # T = 4, D = 12
    model, _ = make_model(cfg, seed=5)
    torch_block = model.blocks[b]
    x = torch.from_numpy(tokens(cfg, 1, seed=b))
    y = torch.tensor([1])
    T, D = cfg.tokens, cfg.token_dim
    # dz[t, i] / dx[s, j], image order
    J = jacobian(lambda v: torch_block(v, y)[0], x, vectorize=True).reshape(T, D, T, D)
    if b % 2:                                                            # into the block's (reversed) order
        J = J.flip(0).flip(2)
    with torch.no_grad():
        a = torch_block.conditioner(torch_block.permute(x), y)[0][0]                 # [T, D] raw, before the shift
    for t in range(T):
        for s in range(t + 1, T):
            assert J[t, :, s].abs().max() < 1e-14, f"z_{t} depends on the later token {s}"
        scale = torch.ones(D, dtype=x.dtype) if t == 0 else torch.exp(-a[t - 1])
        torch.testing.assert_close(J[t, :, t], torch.diag(scale), rtol=1e-12, atol=1e-14)
    assert J[T - 1, :, 0].abs().max() > 1e-3                              # not merely diagonal


def test_one_rule_orders_the_blocks_of_both_backends(small):
    _, cfg, model, params = small
    odd_reversed = [b % 2 == 1 for b in range(cfg.blocks)]                # the released layout
    assert [reverses(b) for b in range(cfg.blocks)] == odd_reversed
    assert [blk.reverse for blk in blocks(params, cfg)] == [blk.reverse for blk in model.blocks] == odd_reversed


def test_shift_and_token_zero_pass_unchanged(rng):
    o = rng.normal(size=(2, 5, 3))
    shifted = shift(o)
    assert np.all(shifted[:, 0] == 0)
    np.testing.assert_array_equal(shifted[:, 1:], o[:, :-1])
    cfg = SMALL_CONFIGS["uncond-odd-P4"]
    _, params = make_model(cfg, seed=2)
    x = tokens(cfg, 2)
    for b in range(2):
        z, _ = block_forward(block(params, b), x, None, cfg)
        first, second = (-1, -2) if b == 1 else (0, 1)                  # the block's tokens 0, 1 in image order
        np.testing.assert_array_equal(z[:, first], x[:, first])
        assert np.abs(z[:, second] - x[:, second]).max() > 1e-3


def test_single_block_inverse_with_odd_order(rng):
    cfg = SMALL_CONFIGS["uncond-odd-P4"]
    _, params = make_model(cfg, seed=4)
    x = tokens(cfg, 2)
    blk = block(params, 1)
    assert blk.reverse
    z, _ = block_forward(blk, x, None, cfg)
    np.testing.assert_allclose(block_inverse(blk, z, None, cfg), x, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(permute(permute(x, True), True), x)


def test_negative_and_missing_labels_use_the_mean_class_embedding():
    cfg = SMALL_CONFIGS["cond-odd-P1-gray"]
    _, params = make_model(cfg, seed=6)
    blk = block(params, 0)
    table = blk.params["class_embed"]                                    # [K, 1, C]
    e = class_embedding(blk, np.array([2, -1, 0, -7]), 4)
    np.testing.assert_array_equal(e[0], table[2])
    np.testing.assert_array_equal(e[2], table[0])
    np.testing.assert_allclose(e[1], table.mean(0), rtol=1e-15)
    np.testing.assert_allclose(e[3], table.mean(0), rtol=1e-15)
    np.testing.assert_allclose(class_embedding(blk, None, 4), np.stack([table.mean(0)] * 4), rtol=1e-15)
    # in the whole conditioner: "no label" behaves like a class whose embedding is the mean
    u = tokens(cfg, 1)
    mean_class = Block(dict(blk.params, class_embed=np.concatenate([table, table.mean(0, keepdims=True)])), False)
    for y in (np.array([-1]), None):
        np.testing.assert_allclose(conditioner(blk, u, y, cfg)[0],
                                   conditioner(mean_class, u, np.array([cfg.num_classes]), cfg)[0],
                                   rtol=1e-12, atol=1e-13)
    assert np.abs(conditioner(blk, u, np.array([0]), cfg)[0] - conditioner(blk, u, None, cfg)[0]).max() > 1e-3


def test_labels_out_of_range_are_refused():
    check_labels(np.array([0, 3, -1]), 4, 3)
    check_labels(np.array([-1, -2]), 0, 2)
    check_labels(None, 0, 5)
    with pytest.raises(ValueError, match=r"label 4 is out of range: labels must be < 4 \(or < 0 for no label\)"):
        check_labels(np.array([0, 4]), 4, 2)
    with pytest.raises(ValueError, match="label 0 is out of range: this model is unconditional, so only labels < 0"):
        check_labels(np.array([-1, 0]), 0, 2)
    with pytest.raises(ValueError, match=r"labels must have shape \[3\], got \(2,\)"):
        check_labels(np.array([0, 1]), 4, 3)


# ---- guidance ------------------------------------------------------------------------------------

def test_guidance_arithmetic():
    a, m, a_u, m_u = 2.0, -1.0, 0.5, 1.0
    assert guide(a, m, a_u, m_u, Guidance(1.5, "a"), 1.5) == (2.0 + 1.5 * 1.5, -1.0)
    assert guide(a, m, a_u, m_u, Guidance(1.5, "b"), 1.5) == (2.0, -1.0 + 1.5 * -2.0)
    assert guide(a, m, a_u, m_u, Guidance(1.5, "ab"), 0.25) == (2.375, -1.5)


def test_annealing_schedule():
    g, T = 3.0, 7
    annealed = Guidance(g, annealed=True)
    assert [annealed.weight_at(t, T) for t in range(T - 1)] == pytest.approx([g * (t + 1) / (T - 1) for t in range(6)])
    assert annealed.weight_at(T - 2, T) == pytest.approx(g)          # the last step gets the full weight
    np.testing.assert_allclose(annealed.weight_at(np.arange(3)[:, None], T), [[0.5], [1.0], [1.5]])
    assert Guidance(g).weight_at(0, T) == g and Guidance(g).weight_at(5, T) == g


def test_guided_calls_the_unconditional_branch_with_its_temperature():
    calls = []

    def branch(label, cache, temperature):
        calls.append((label, cache, temperature))
        return (np.array([1.0]), np.array([2.0])) if label is not None else (np.array([0.0]), np.array([3.0]))

    caches = ("cond", "uncond")
    for off in (None, Guidance(0.0)):
        calls.clear()
        assert guided(branch, "y", caches, off, 0, 4) == (1.0, 2.0)
        assert calls == [("y", "cond", 1.0)]
    calls.clear()
    a, m = guided(branch, "y", caches, Guidance(2.0, "ab", annealed=True, temperature=0.4), 1, 5)
    assert calls == [("y", "cond", 1.0), (None, "uncond", 0.4)]
    assert (a, m) == (1.0 + 1.0 * 1.0, 2.0 + 1.0 * -1.0)                # g_1 = 2 * 2 / 4 = 1


def test_bad_guidance_settings():
    with pytest.raises(ValueError, match="guidance weight must be a finite number >= 0, got -1"):
        Guidance(-1.0)
    with pytest.raises(ValueError, match=r"guide what must be 'a' \(log-scale\), 'b' \(shift\) or 'ab', got 'am'"):
        Guidance(1.0, what="am")
    with pytest.raises(ValueError, match="attention temperature must be a finite number > 0, got 0"):
        Guidance(1.0, temperature=0)


def inverse_by_prefixes(blk: Block, z, y, cfg, g: Guidance):
    """Brute force: at every step re-run both branches on the whole prefix (no cache) and guide by hand."""
    u = permute(z, blk.reverse)
    x = u.copy()
    T = cfg.tokens
    for t in range(T - 1):
        a, m = (o[:, t] for o in conditioner(blk, x[:, :t + 1], y, cfg))
        a_u, m_u = (o[:, t] for o in conditioner(blk, x[:, :t + 1], None, cfg, temperature=g.temperature))
        w = g.weight * (t + 1) / (T - 1) if g.annealed else g.weight
        a_g = a + w * (a - a_u) if "a" in g.what else a
        m_g = m + w * (m - m_u) if "b" in g.what else m
        x[:, t + 1] = u[:, t + 1] * np.exp(a_g) + m_g
    return permute(x, blk.reverse)


@pytest.mark.parametrize("g", [Guidance(1.5, "ab", annealed=True, temperature=0.6), Guidance(0.8, "a"),
                               Guidance(2.0, "b", temperature=1.4)], ids=["ab-annealed-tau", "a", "b-tau"])
@pytest.mark.parametrize("b", [0, 1])
def test_cached_guided_inverse_equals_brute_force(g, b):
    cfg = SMALL_CONFIGS["cond-even-P2"]
    _, params = make_model(cfg, seed=9)
    blk = block(params, b)
    z, y = tokens(cfg, 3, seed=b), np.array([1, -1, 3])
    got = block_inverse(blk, z, y, cfg, g)
    np.testing.assert_allclose(got, inverse_by_prefixes(blk, z, y, cfg, g), rtol=1e-10, atol=1e-10)
    assert np.abs(got - block_inverse(blk, z, y, cfg)).max() > 1e-3   # guidance changed the sample
