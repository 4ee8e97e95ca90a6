"""Every NumPy backward (tarflow_ref/backward.py) against torch autograd in float64 on random inputs
and random cotangents, on weights away from the initialisation; the whole-model score also against
central finite differences (a reference that shares no code with either backend)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tarflow_ref import TarFlow, backward as bw, to_numpy
from tarflow_ref.attention import softmax, sub_params
from tarflow_ref.flow import block
from tarflow_ref.logdet import nll_per_dim, prior_nll
from tarflow_ref.model import forward

from conftest import SMALL_CONFIGS, make_model

PIECE_TOL = 1e-9
MODEL_TOL = 1e-8


def rel_err(ours, reference):
    reference = reference.detach().numpy() if torch.is_tensor(reference) else reference
    return np.linalg.norm(ours - reference) / np.linalg.norm(reference)


def torch_vjp(f, inputs, cotangents):
    """(dy/dx)^T g by autograd: inputs, cotangents are NumPy arrays; f returns a tensor or a tuple."""
    xs = [torch.tensor(x, requires_grad=True) for x in inputs]
    outs = f(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o * torch.tensor(g)).sum() for o, g in zip(outs, cotangents))
    return [g.numpy() for g in torch.autograd.grad(total, xs)]


@pytest.fixture(scope="module")
def piece():
    """A conditional model with 4 heads (C = 32, d = 8), its first layer and a random sequence."""
    cfg = SMALL_CONFIGS["cond-even-P2"]
    model, params = make_model(cfg, seed=7)
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, cfg.tokens, cfg.width))
    return cfg, model, params, h, rng


def test_linear_backward(piece):
    cfg, model, params, h, rng = piece
    W, b = params["blocks.0.proj_out.weight"], params["blocks.0.proj_out.bias"]
    g = rng.normal(size=h.shape[:-1] + (W.shape[0],))
    (ref,) = torch_vjp(lambda x: F.linear(x, torch.tensor(W), torch.tensor(b)), [h], [g])
    assert rel_err(bw.linear_backward(g, W), ref) < PIECE_TOL


def test_layer_norm_backward(piece):
    cfg, model, params, h, rng = piece
    w, b = params["blocks.0.attn_blocks.0.attention.norm.weight"], params["blocks.0.attn_blocks.0.attention.norm.bias"]
    x = 3.0 * h + 1.5                                     # a mean and scale to normalise away
    g = rng.normal(size=x.shape)
    (ref,) = torch_vjp(lambda t: F.layer_norm(t, (cfg.width,), torch.tensor(w), torch.tensor(b), eps=1e-5), [x], [g])
    assert rel_err(bw.layer_norm_backward(x, w, g), ref) < PIECE_TOL


def test_gelu_backward(rng):
    x = rng.normal(size=(4, 50)) * 3
    x[0, :3] = [0.0, -8.0, 8.0]                           # the origin and both saturated tails
    g = rng.normal(size=x.shape)
    (ref,) = torch_vjp(lambda t: F.gelu(t), [x], [g])
    assert rel_err(bw.gelu_backward(x, g), ref) < PIECE_TOL


def test_softmax_backward(rng):
    s = rng.normal(size=(2, 3, 5, 7)) * 4
    g = rng.normal(size=s.shape)
    (ref,) = torch_vjp(lambda t: torch.softmax(t, -1), [s], [g])
    assert rel_err(bw.softmax_backward(softmax(s), g), ref) < PIECE_TOL


@pytest.mark.parametrize("temperature", [1.0, 0.3, 2.5])
def test_causal_attention_backward(piece, temperature):
    cfg, model, params, h, rng = piece
    attention = copy.deepcopy(model.blocks[1].attn_blocks[1].attention)
    attention.norm = nn.Identity()                        # the NumPy piece takes layer-normed input
    g = rng.normal(size=h.shape)
    (ref,) = torch_vjp(lambda t: attention(t, temperature=temperature), [h], [g])
    p = sub_params(params, "blocks.1.attn_blocks.1.attention.")
    assert rel_err(bw.causal_attention_backward(p, h, g, cfg.heads, temperature), ref) < PIECE_TOL


def test_causal_attention_backward_is_causal(piece):
    """A cotangent on token t reaches only tokens 0..t."""
    cfg, model, params, h, rng = piece
    g = np.zeros_like(h)
    g[:, 5] = rng.normal(size=(len(h), cfg.width))
    gh = bw.causal_attention_backward(sub_params(params, "blocks.0.attn_blocks.0.attention."), h, g, cfg.heads)
    assert np.all(gh[:, 6:] == 0) and np.all(np.abs(gh[:, :6]).sum(-1) > 0)


def test_mlp_backward(piece):
    cfg, model, params, h, rng = piece
    g = rng.normal(size=h.shape)
    (ref,) = torch_vjp(model.blocks[0].attn_blocks[1].mlp.main, [h], [g])
    assert rel_err(bw.mlp_backward(sub_params(params, "blocks.0.attn_blocks.1.mlp."), h, g), ref) < PIECE_TOL


@pytest.mark.parametrize("temperature", [1.0, 0.4])
def test_transformer_layer_backward(piece, temperature):
    cfg, model, params, h, rng = piece
    layer = model.blocks[1].attn_blocks[0]
    g = rng.normal(size=h.shape)
    (ref,) = torch_vjp(lambda t: layer(t, temperature=temperature), [h], [g])
    p = sub_params(params, "blocks.1.attn_blocks.0.")
    assert rel_err(bw.transformer_layer_backward(p, h, g, cfg.heads, temperature), ref) < PIECE_TOL


def test_shift_backward(rng):
    o, g = rng.normal(size=(2, 2, 6, 5))
    (ref,) = torch_vjp(lambda t: F.pad(t[:, :-1], (0, 0, 1, 0)), [o], [g])
    assert rel_err(bw.shift_backward(g), ref) < PIECE_TOL


def test_prior_nll_backward(rng):
    z, = rng.normal(size=(1, 3, 4, 6))
    g = rng.normal(size=3)
    (ref,) = torch_vjp(prior_nll, [z], [g])
    assert rel_err(bw.prior_nll_backward(z, g), ref) < PIECE_TOL


def test_patchify_backward(rng):
    x = rng.normal(size=(2, 3, 8, 8))
    g = rng.normal(size=(2, 4, 48))
    (ref,) = torch_vjp(lambda t: F.unfold(t, 4, stride=4).transpose(1, 2), [x], [g])
    assert rel_err(bw.patchify_backward(g, 4, 3), ref) < PIECE_TOL


def labels_for(cfg, batch, kind):
    """'labelled': all labels >= 0; 'dropped': some y < 0 (mean embedding); 'none': y = None."""
    if kind == "none" or not cfg.conditional:
        return None if kind != "dropped" else -np.ones(batch, dtype=np.int64)
    y = np.arange(batch) % cfg.num_classes
    if kind == "dropped":
        y[::2] = -1
    return y


def torch_labels(y):
    return None if y is None else torch.tensor(y)


@pytest.mark.parametrize("kind", ["labelled", "dropped", "none"])
def test_conditioner_and_block_backward(small, rng, kind):
    name, cfg, model, params = small
    x = rng.normal(size=(3, cfg.tokens, cfg.token_dim))
    y = labels_for(cfg, 3, kind)
    g_a, g_m, g_z = rng.normal(size=(3,) + x.shape)
    g_ld = rng.normal(size=3)
    for b, torch_block in enumerate(model.blocks):
        blk = block(params, b)
        (ref,) = torch_vjp(lambda u: torch_block.conditioner(u, torch_labels(y)), [x], [g_a, g_m])
        assert rel_err(bw.conditioner_backward(blk, x, y, cfg, g_a, g_m), ref) < PIECE_TOL
        (ref,) = torch_vjp(lambda t: torch_block(t, torch_labels(y)), [x], [g_z, g_ld])
        assert rel_err(bw.block_backward(blk, x, y, cfg, g_z, g_ld), ref) < PIECE_TOL


def torch_log_prob(model, x, y):
    """log p(x | y) per sample by the torch model: -N * nll_per_dim."""
    z, logdet = model(x, torch_labels(y))
    return -z.shape[1] * z.shape[2] * nll_per_dim(z, logdet)


@pytest.mark.parametrize("kind", ["labelled", "dropped", "none"])
def test_grad_log_prob_equals_autograd(small, rng, kind):
    name, cfg, model, params = small
    x = rng.normal(size=(3, cfg.channels, cfg.image_size, cfg.image_size)) * 0.6
    y = labels_for(cfg, 3, kind)
    (ref,) = torch_vjp(lambda t: torch_log_prob(model, t, y), [x], [np.ones(3)])
    ours = bw.grad_log_prob(params, cfg, x, y)
    assert ours.shape == x.shape
    assert rel_err(ours, ref) < MODEL_TOL


def test_model_backward_with_random_cotangents(small, rng):
    """The whole flow's VJP for arbitrary cotangents of z and of the log-det, not just the score's."""
    name, cfg, model, params = small
    x = rng.normal(size=(2, cfg.channels, cfg.image_size, cfg.image_size))
    g_z, g_ld = rng.normal(size=(2, cfg.tokens, cfg.token_dim)), rng.normal(size=2)
    (ref,) = torch_vjp(model, [x], [g_z, g_ld])
    assert rel_err(bw.model_backward(params, cfg, x, None, g_z, g_ld), ref) < MODEL_TOL


def test_grad_log_prob_equals_central_differences():
    """Every coordinate of the score of a tiny model (4x4 grey, P = 1) by central differences of
    the NumPy log-density: error O(eps^2) from truncation, O(1e-16 / eps) from rounding."""
    cfg = SMALL_CONFIGS["cond-odd-P1-gray"]
    _, params = make_model(cfg, seed=11, out_scale=0.6)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 1, 4, 4)) * 0.7
    y = np.array([2, -1])

    def log_prob(v):
        z, logdet = forward(params, cfg, v, y)
        return -cfg.tokens * cfg.token_dim * nll_per_dim(z, logdet)       # [B]

    eps = 1e-5
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape[1:]):
        step = np.zeros_like(x)
        step[(slice(None),) + idx] = eps
        fd[(slice(None),) + idx] = (log_prob(x + step) - log_prob(x - step)) / (2 * eps)
    assert rel_err(bw.grad_log_prob(params, cfg, x, y), fd) < 1e-7


def test_grad_log_prob_of_the_identity_flow_is_the_gaussian_score(rng):
    """At the initialisation (proj_out = 0) every block is the identity, so p = N(0, I): score = -x."""
    cfg = SMALL_CONFIGS["uncond-odd-P4"]
    params = to_numpy(TarFlow(cfg).double())
    x = rng.normal(size=(2, 3, 8, 8))
    assert np.allclose(bw.grad_log_prob(params, cfg, x), -x, rtol=0, atol=1e-12)


def test_grad_log_prob_rejects_bad_input(small):
    name, cfg, model, params = small
    with pytest.raises(ValueError, match="expected images"):
        bw.grad_log_prob(params, cfg, np.zeros((2, cfg.channels, cfg.image_size + 1, cfg.image_size)))
    with pytest.raises(ValueError, match="labels must have shape"):
        bw.grad_log_prob(params, cfg, np.zeros((2, cfg.channels, cfg.image_size, cfg.image_size)), np.zeros(3, int))
