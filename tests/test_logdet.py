"""Log-determinant, prior, loss, NLL and bits/dim (book/checkpoints.md, "One flow block", "Bits per dimension").

The summed per-block log-det must be log|det dz/dx| / (T*D) (a mean, not a sum), checked against
brute-force Jacobians: torch autograd on the torch model, central finite differences on the NumPy
one. The likelihood formulas are checked on analytic flows (identity and constant affine blocks)
whose density is known in closed form (scipy.stats.norm).
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch.autograd.functional import jacobian

from tarflow_ref import model as np_model
from tarflow_ref.logdet import LOG_2PI, bits_per_dim, dequantize, loss, nll_per_dim, prior_nll
from tarflow_ref.patchify import patchify

from conftest import SMALL_CONFIGS, make_model

TINY = {  # at most 192 values per image, so a dense Jacobian is cheap
    "cond-even-P2": SMALL_CONFIGS["cond-even-P2"].replace(image_size=4),
    "uncond-odd-P4": SMALL_CONFIGS["uncond-odd-P4"],
    "cond-odd-P1-gray": SMALL_CONFIGS["cond-odd-P1-gray"],
}


def image(cfg, batch, seed):
    return np.random.default_rng(seed).uniform(-1, 1, size=(batch, cfg.channels, cfg.image_size, cfg.image_size))


def label(cfg):
    return np.array([cfg.num_classes - 1]) if cfg.conditional else None


@pytest.mark.parametrize("name", list(TINY))
def test_logdet_is_the_mean_log_jacobian_torch_autograd(name):
    cfg = TINY[name]
    model, _ = make_model(cfg, seed=11)
    x = torch.from_numpy(image(cfg, 1, seed=0))
    y = None if label(cfg) is None else torch.from_numpy(label(cfg))
    N = cfg.tokens * cfg.token_dim
    J = jacobian(lambda v: model(v, y)[0], x, vectorize=True).reshape(N, N)
    _, log_abs_det = torch.linalg.slogdet(J)
    with torch.no_grad():
        _, logdet = model(x, y)
    assert abs(logdet.item()) > 5e-3                                             # not volume-preserving
    assert logdet.item() == pytest.approx(log_abs_det.item() / N, rel=1e-10)


@pytest.mark.parametrize("name", ["cond-even-P2", "cond-odd-P1-gray"])
def test_logdet_is_the_mean_log_jacobian_numpy_finite_differences(name):
    cfg = TINY[name]
    _, params = make_model(cfg, seed=12)
    x, y = image(cfg, 1, seed=1), label(cfg)
    N, eps = x.size, 1e-5
    J = np.empty((N, N))
    for k in range(N):
        step = np.zeros(N)
        step[k] = eps
        plus = np_model.forward(params, cfg, x + step.reshape(x.shape), y)[0]
        minus = np_model.forward(params, cfg, x - step.reshape(x.shape), y)[0]
        J[:, k] = (plus - minus).reshape(-1) / (2 * eps)
    _, logdet = np_model.forward(params, cfg, x, y)
    assert logdet[0] == pytest.approx(np.linalg.slogdet(J)[1] / N, rel=1e-7)


def constant_affine_params(cfg, log_scale, shift, seed=13):
    """Weights away from init, except proj_out = 0 with bias [a0, m0]: every block then maps
    u_t -> (u_t - m0) exp(-a0) for t >= 1 and passes its token 0."""
    _, params = make_model(cfg, seed=seed)
    for b in range(cfg.blocks):
        params[f"blocks.{b}.proj_out.weight"] = np.zeros_like(params[f"blocks.{b}.proj_out.weight"])
        params[f"blocks.{b}.proj_out.bias"] = np.concatenate([log_scale, shift])
    return params


def test_constant_affine_block_has_the_analytic_density():
    """One block with constant a0, m0: x_0 ~ N(0, 1) and x_t ~ N(m0, exp(2 a0)) for t >= 1."""
    cfg = SMALL_CONFIGS["cond-even-P2"].replace(image_size=4, blocks=1)   # T = 4, D = 12
    T, D, N = cfg.tokens, cfg.token_dim, cfg.tokens * cfg.token_dim
    rng = np.random.default_rng(14)
    a0, m0 = rng.normal(0, 0.5, D), rng.normal(0, 0.5, D)
    params = constant_affine_params(cfg, a0, m0)
    x = image(cfg, 3, seed=2)
    z, logdet = np_model.forward(params, cfg, x, np.array([0, -1, 2]))
    u = patchify(x, cfg.patch_size)
    np.testing.assert_allclose(z[:, 0], u[:, 0], rtol=0, atol=0)
    np.testing.assert_allclose(z[:, 1:], (u[:, 1:] - m0) * np.exp(-a0), rtol=1e-14)
    np.testing.assert_allclose(logdet, -(T - 1) / T * a0.mean(), rtol=1e-13)      # mean over T*D, not a sum
    log_p = norm.logpdf(u[:, :1]).sum((1, 2)) + norm.logpdf(u[:, 1:], m0, np.exp(a0)).sum((1, 2))
    np.testing.assert_allclose(nll_per_dim(z, logdet), -log_p / N, rtol=1e-12)
    np.testing.assert_allclose(bits_per_dim(z, logdet), (-log_p / N + math.log(128)) / math.log(2), rtol=1e-12)


def test_identity_flow_on_gaussian_data():
    """proj_out = 0 (as at initialisation; every other weight random) makes the identity flow:
    NLL/dim of N(0, I) data averages to the entropy 0.5 log(2 pi e), the loss to that - 0.5 log(2 pi)."""
    cfg = SMALL_CONFIGS["uncond-odd-P4"]
    model, _ = make_model(cfg, seed=15)
    for block in model.blocks:
        torch.nn.init.zeros_(block.proj_out.weight)
        torch.nn.init.zeros_(block.proj_out.bias)
    x = torch.from_numpy(np.random.default_rng(15).normal(size=(200, cfg.channels, cfg.image_size, cfg.image_size)))
    with torch.no_grad():
        z, logdet = model(x)
        torch.testing.assert_close(z, patchify(x, cfg.patch_size), rtol=0, atol=0)
        assert torch.all(logdet == 0)
        nll = nll_per_dim(z, logdet)
        torch.testing.assert_close(nll, torch.from_numpy(-norm.logpdf(x.numpy()).mean((1, 2, 3))), rtol=1e-13, atol=0)
        entropy = 0.5 * math.log(2 * math.pi * math.e)
        standard_error = math.sqrt(0.5 / x.numel())                            # Var(z^2 / 2) = 1/2
        assert abs(nll.mean().item() - entropy) < 4 * standard_error
        assert model.loss(x).item() == pytest.approx(nll.mean().item() - 0.5 * LOG_2PI, rel=1e-12)


def test_loss_and_prior_formulas(rng):
    z, logdet = rng.normal(size=(4, 5, 6)), rng.normal(size=4)
    assert loss(z, logdet) == pytest.approx(0.5 * np.mean(z ** 2) - logdet.mean(), rel=1e-14)
    np.testing.assert_allclose(prior_nll(z), [-norm.logpdf(zb).mean() for zb in z], rtol=1e-13)
    assert loss(z, logdet) == pytest.approx(nll_per_dim(z, logdet).mean() - 0.5 * LOG_2PI, rel=1e-12)


def test_uniform_density_costs_eight_bits():
    """A density of 1/2 per dimension on [-1, 1] is the uniform distribution over 256 levels: 8 bits.
    Realised as z = 0 with logdet = 0.5 log(2 pi) - log 2, so that NLL/dim = log 2."""
    z = np.zeros((2, 3, 4))
    logdet = np.full(2, 0.5 * LOG_2PI - math.log(2))
    np.testing.assert_allclose(nll_per_dim(z, logdet), math.log(2), rtol=1e-14)
    np.testing.assert_allclose(bits_per_dim(z, logdet), 8.0, rtol=1e-14)


def test_dequantize():
    x_int = np.arange(256).reshape(4, 64)
    x = dequantize(x_int, np.random.default_rng(16))
    u = np.random.default_rng(16).uniform(size=x_int.shape)
    np.testing.assert_allclose(x, (x_int + u) / 256 * 2 - 1, rtol=1e-15)
    assert x.min() >= -1 and x.max() < 1
    np.testing.assert_array_equal(np.floor((x + 1) * 128), x_int)     # each level keeps its own bin
