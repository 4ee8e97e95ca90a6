"""IGM, CRM (tarflow_ref/diagnostics.py, torch_backend/diagnostics.py) and the traces of the GS-Jacobi
fast path (torch_backend/jacobi.py) against independent routes and analytic cases."""
import numpy as np
import pytest
import torch

from tarflow_ref import jacobi
from tarflow_ref.diagnostics import block_metrics, diagnose, igm
from tarflow_ref.flow import block, block_forward, blocks, conditioner, permute, shift
from tarflow_ref.patchify import patchify
from tarflow_ref.strategy import BlockPlan
from tarflow_ref.torch_backend import jacobi as tj
from tarflow_ref.torch_backend.diagnostics import diagnose_torch

from conftest import SMALL_CONFIGS, make_model


def setup(name, seed=4, batch=3):
    cfg = SMALL_CONFIGS[name]
    model, params = make_model(cfg, seed=seed, out_scale=0.2)
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(batch, cfg.channels, cfg.image_size, cfg.image_size))
    y = np.array([cfg.num_classes - 1, -1, 0][:batch]) if cfg.conditional else None
    return cfg, model, params, images, y


def chain(params, cfg, images, y):
    """(block input, block output) in IMAGE order for every forward block b."""
    z, pairs = patchify(images, cfg.patch_size), []
    for blk in blocks(params, cfg):
        out, _ = block_forward(blk, z, y, cfg)
        pairs.append((z, out))
        z = out
    return pairs


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_igm_is_the_residual_of_one_jacobi_iteration(name):
    """IGM(x0) = ||mean_B(F(x0) - x)||: one iteration of the solver from x0 gives F(x0)."""
    cfg, _, params, images, y = setup(name)
    d = diagnose(params, cfg, images, y)
    for b, (x, z) in enumerate(chain(params, cfg, images, y)):
        for guess in (0, 1):
            x1 = jacobi.block_inverse_gsj(block(params, b), z, y, cfg, BlockPlan(1, 1, guess))
            assert d.igm[b, guess] == pytest.approx(np.linalg.norm((x1 - x).mean(0)), rel=1e-12)
    assert d.igm.shape == (cfg.blocks, 2) and d.igm.min() > 1e-3


def test_igm_vanishes_at_the_fixed_point():
    cfg, _, params, images, y = setup("cond-even-P2")
    x, z = chain(params, cfg, images, y)[1]
    blk = block(params, 1)
    u, out = permute(x, blk.reverse), permute(z, blk.reverse)
    a, m = conditioner(blk, u, y, cfg)
    assert igm(u, out, shift(a), shift(m)) < 1e-13
    assert igm(u, out, shift(a), shift(m) + 1e-3) > 1e-4      # and it is not blind


def test_crm_of_a_shift_only_block_is_the_spectral_norm_of_w_m():
    cfg, _, params, images, y = setup("cond-odd-P1-gray")      # D = 1, C = 16: W_m is [1, 16]
    D, C = cfg.token_dim, cfg.width
    w = np.random.default_rng(0).standard_normal((D, C))
    params = dict(params, **{"blocks.0.proj_out.weight": np.concatenate([np.zeros((D, C)), w])})
    crm = diagnose(params, cfg, images, y).crm[0]
    assert crm == pytest.approx(np.sqrt((w ** 2).sum()), rel=1e-12)          # one row: 2-norm = row norm


def test_crm_with_a_constant_log_scale_is_analytic():
    """W_m = 0, W_a = eps * (orthonormal rows), bias_a = beta: a_t = beta for t >= 1, a_0 = 0, so
    CRM = ||mean_B(x * exp(-a))||_F * eps up to O(eps)."""
    cfg, _, params, images, y = setup("cond-even-P2")
    D, C = cfg.token_dim, cfg.width
    eps, beta = 1e-7, 0.4
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((C, D)))     # [C, D], orthonormal columns
    params = dict(params, **{"blocks.0.proj_out.weight": np.concatenate([eps * q.T, np.zeros((D, C))]),
                             "blocks.0.proj_out.bias": np.concatenate([np.full(D, beta), np.zeros(D)])})
    x = patchify(images, cfg.patch_size)                       # block 0 reads the image order
    scale = np.concatenate([np.ones((1, D)), np.full((cfg.tokens - 1, D), np.exp(-beta))])
    want = np.linalg.norm((x * scale).mean(0)) * eps
    assert diagnose(params, cfg, images, y).crm[0] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_torch_and_numpy_diagnostics_agree(name):
    cfg, model, params, images, y = setup(name)
    want = diagnose(params, cfg, images, y)
    got = diagnose_torch(model, torch.from_numpy(images), None if y is None else torch.from_numpy(y))
    np.testing.assert_allclose(got.igm, want.igm, rtol=1e-10)
    np.testing.assert_allclose(got.crm, want.crm, rtol=1e-10)


def test_block_metrics_takes_the_guesses_in_strategy_order():
    cfg, _, params, images, y = setup("cond-even-P2")
    x, z = chain(params, cfg, images, y)[0]
    blk = block(params, 0)
    seen = []

    def evaluate(tokens):
        seen.append(tokens.copy())
        return conditioner(blk, tokens, y, cfg)
    block_metrics(x, z, evaluate, blk.params["proj_out.weight"])
    assert np.array_equal(seen[0], x) and np.array_equal(seen[1], z)                 # a(x), guess 0: z
    assert np.array_equal(seen[2][:, 0], z[:, 0]) and not seen[2][:, 1:].any()      # guess 1: [z_0, 0..]


def test_trace_residuals_are_norms_of_iterate_differences():
    cfg, model, params, images, y = setup("cond-even-P2")
    x, z = chain(params, cfg, images, y)[0]
    B, T, D = z.shape
    plan = BlockPlan(2, 5)
    trace = tj.Trace(keep_iterates=True)
    tj.block_inverse_gsj(model.blocks[0], torch.from_numpy(z), torch.from_numpy(y), plan, record=trace.block(0, plan))
    M = T // 2
    assert trace.iterations(0) == [5, 5]
    for i in range(2):
        iterates = [it.numpy() for it in trace.iterates[(0, i)]]
        assert all(it.shape == (B, M, D) for it in iterates)
        for k in range(1, 5):
            step = np.linalg.norm(iterates[k] - iterates[k - 1]) / (B * D)
            assert trace.residuals[(0, i)][k] == pytest.approx(step, rel=1e-12)
    first = np.linalg.norm(trace.iterates[(0, 0)][0].numpy() - z[:, :M]) / (B * D)  # from x0 = z
    assert trace.residuals[(0, 0)][0] == pytest.approx(first, rel=1e-12)
