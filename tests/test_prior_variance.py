"""Every sampler starts from the prior's scale (book/checkpoints.md, "Inverse, guidance and sampling"):

    image = unpatchify(inverse(noise * sqrt(var)))       noise: [B, T, D] ~ N(0, I),  var: [T, D]

checked on models whose `var` is random and positive: with var = 1, as every other test model
has, dropping the factor or using var for sqrt(var) changes nothing. The samplers: NumPy and
torch, sequential and GS-Jacobi (an exact strategy: Jacobi with T - 1 iterations on some blocks,
GS modules on others), with guidance. The reference is the NumPy float64 `inverse`, and,
independently of every inverse, the forward pass of the sample, which must give back
noise * sqrt(var).
"""
import numpy as np
import pytest
import torch

from tarflow_ref import Guidance, jacobi, model as np_model, sample, sample_gsj
from tarflow_ref.patchify import patchify, unpatchify
from tarflow_ref.strategy import Strategy

from conftest import SMALL_CONFIGS, make_model

GUIDANCE = Guidance(weight=1.5, what="ab", annealed=False, temperature=1.2)
CONFIGS = ["cond-odd-P1-gray", "uncond-odd-P4"]         # guided, one block of 16 tokens; three blocks of 4


@pytest.fixture(params=CONFIGS, ids=CONFIGS)
def scaled(request):
    """(cfg, torch model float64, NumPy params, noise [B, T, D], labels or None, guidance or None,
    the reference image) with var drawn from exp(N(0, 0.3^2)) per entry."""
    cfg = SMALL_CONFIGS[request.param]
    model, _ = make_model(cfg, seed=7, out_scale=0.2)       # a well-conditioned inverse of the scaled noise
    rng = np.random.default_rng(11)
    with torch.no_grad():
        model.var.copy_(torch.from_numpy(np.exp(0.3 * rng.standard_normal((cfg.tokens, cfg.token_dim)))))
    params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    assert np.abs(np.log(params["var"])).max() > 0.5                                # far from 1
    noise = rng.standard_normal((3, cfg.tokens, cfg.token_dim))
    y = np.array([0, 2, 1]) % cfg.num_classes if cfg.conditional else None
    guidance = GUIDANCE if cfg.conditional else None
    tokens = np_model.inverse(params, cfg, noise * np.sqrt(params["var"]), y, guidance)
    reference = unpatchify(tokens, cfg.patch_size, cfg.channels)
    assert np.isfinite(reference).all()
    return cfg, model, params, noise, y, guidance, reference


def exact_strategy(cfg):
    """Jacobi run to T - 1 iterations on even sampling positions, GS modules of 2 tokens on odd ones."""
    N, T = cfg.blocks, cfg.tokens
    return Strategy([1 if b % 2 == 0 else T // 2 for b in range(N)], [T - 1] * N, [b % 2 for b in range(N)])


def assert_is_the_scaled_sample(image, scaled, atol):
    cfg, _, params, noise, y, guidance, reference = scaled
    image = np.asarray(image, dtype=np.float64)
    np.testing.assert_allclose(image, reference, rtol=0, atol=atol)
    # independent of every inverse: the forward pass maps the image back to the scaled noise
    # (with guidance the inverse is not the forward's inverse, so the check needs none)
    if guidance is None:
        z, _ = np_model.forward(params, cfg, image, y)
        np.testing.assert_allclose(z, noise * np.sqrt(params["var"]), rtol=0, atol=atol)


def test_numpy_sequential(scaled):
    cfg, _, params, noise, y, guidance, _ = scaled
    assert_is_the_scaled_sample(np_model.sample(params, cfg, noise, y, guidance), scaled, 1e-12)


def test_numpy_gs_jacobi(scaled):
    cfg, _, params, noise, y, guidance, _ = scaled
    image = np_model.sample(params, cfg, noise, y, guidance, sampler=jacobi.gs_jacobi(exact_strategy(cfg)))
    assert_is_the_scaled_sample(image, scaled, 1e-9)


def test_torch_sequential(scaled):
    """sample() scales for every inverse it runs (the engine, Sampler's engines, textbook.inverse)."""
    _, model, _, noise, y, guidance, _ = scaled
    image = sample(model, torch.from_numpy(noise), None if y is None else torch.from_numpy(y), guidance)
    assert_is_the_scaled_sample(image, scaled, 1e-10)


def test_torch_gs_jacobi(scaled):
    cfg, model, _, noise, y, guidance, _ = scaled
    image = sample_gsj(model, torch.from_numpy(noise), None if y is None else torch.from_numpy(y),
                       strategy=exact_strategy(cfg), guidance=guidance)
    assert_is_the_scaled_sample(image, scaled, 1e-9)


def test_the_forward_check_sees_the_scale():
    """Guards assert_is_the_scaled_sample: the unscaled sample fails it."""
    cfg = SMALL_CONFIGS["uncond-odd-P4"]
    model, _ = make_model(cfg, seed=7)
    params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    params["var"] = np.full((cfg.tokens, cfg.token_dim), 2.0)
    noise = np.random.default_rng(0).standard_normal((2, cfg.tokens, cfg.token_dim))
    unscaled = unpatchify(np_model.inverse(params, cfg, noise), cfg.patch_size, cfg.channels)
    z, _ = np_model.forward(params, cfg, unscaled)
    assert np.abs(z - noise * np.sqrt(2.0)).max() > 0.1
    assert np.abs(patchify(unscaled, cfg.patch_size)).max() > 0                   # a real image
