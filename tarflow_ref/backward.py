"""Backward pass (vector-Jacobian products) of every piece of TarFlow, down to grad_x log p(x | y)
(NumPy, float64; Zhai et al. 2024, Sec. 2.1-2.2 for the forward pieces, book/checkpoints.md,
"Score denoising" for why the gradient is needed).

For a piece y = f(x) and a cotangent g = dL/dy of any scalar L, the backward returns
dL/dx = (dy/dx)^T g, with the same shape as x. Only gradients with respect to the INPUTS are
formed (the score needs no parameter gradients). Each backward sits next to a reference to its
forward and recomputes the intermediates it needs by calling that same forward code, so there
is no second copy of the model here:

    piece                 forward (tarflow_ref/...)         backward here
    linear                attention.linear                   linear_backward
    layer norm            attention.layer_norm               layer_norm_backward
    GELU                  attention.gelu                     gelu_backward
    softmax               attention.softmax                  softmax_backward
    causal attention      attention.causal_attention         causal_attention_backward
    feed-forward          attention.mlp                      mlp_backward
    transformer layer     attention.transformer_layer        transformer_layer_backward
    shift by one token    flow.shift                         shift_backward
    transformer (a, m)    flow.conditioner                   conditioner_backward
    affine flow block     flow.block_forward                 block_backward
    Gaussian prior        logdet.prior_nll                   prior_nll_backward
    patchify              patchify.patchify                  patchify_backward
    whole flow            model.forward                      model_backward
    log-density           -N * logdet.nll_per_dim            grad_log_prob

Shapes: B batch, n = T tokens (full passes only: position 0, no KV cache), C width, D values per
token, H heads, d head width, N = T * D values per sample.
"""
import numpy as np
from einops import rearrange

from .attention import (
    LN_EPS,
    attention_weights,
    causal_attention,
    layer_norm,
    linear,
    normal_cdf,
    queries_keys_values,
    standardize,
    sub_params,
)
from .flow import Block, block_forward, blocks, conditioner, hidden_states, permute, shift
from .model import forward
from .patchify import patchify, unpatchify


def linear_backward(g, weight):
    """y = x W^T + b  =>  dL/dx = g W.   g: [..., out], weight: [out, in] -> [..., in]."""
    return g @ weight


def layer_norm_backward(x, weight, g, eps=LN_EPS):
    """y = x_hat * w + b with x_hat = (x - mu) / s, s = sqrt(var + eps), over the last axis of size C.

    With g_hat = g * w (the cotangent of x_hat), differentiating mu and var as well gives

        dL/dx = (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat)) / s.

    x, g: [..., C]; weight: [C] -> [..., C].
    """
    x_hat, s = standardize(x, eps)
    g_hat = g * weight
    return (g_hat - g_hat.mean(-1, keepdims=True) - x_hat * (g_hat * x_hat).mean(-1, keepdims=True)) / s


def gelu_backward(x, g):
    """GELU(x) = x Phi(x)  =>  dGELU/dx = Phi(x) + x phi(x), with Phi, phi the standard normal
    CDF and density. Elementwise: x, g: [...] -> [...]."""
    pdf = np.exp(-0.5 * x ** 2) / np.sqrt(2.0 * np.pi)
    return g * (normal_cdf(x) + x * pdf)


def softmax_backward(p, g, axis=-1):
    """p = softmax(s)  =>  dp_i/ds_j = p_i (delta_ij - p_j), so dL/ds = p * (g - sum_j g_j p_j).

    p: the softmax OUTPUT, g: its cotangent (same shape). Masked scores (p = 0) get zero gradient.
    """
    return p * (g - (g * p).sum(axis, keepdims=True))


def causal_attention_backward(p, h, g, heads, temperature=1.0):
    """Backward of `attention.causal_attention` over a full sequence. h: [B, n, C] (layer-normed
    input), g: [B, n, C] -> dL/dh: [B, n, C].

    Forward: [q, k, v] = h W_qkv^T + b,  A = softmax(q k^T c) (causal),  c = 1 / (sqrt(d) tau),
    o = A v,  out = concat_heads(o) W_proj^T + b. Backward, per head:

        g_o = split_heads(g W_proj),   g_A = g_o v^T,   g_v = A^T g_o,
        g_S = softmax_backward(A, g_A),   g_q = c g_S k,   g_k = c g_S^T q,
        dL/dh = concat(g_q, g_k, g_v) W_qkv.
    """
    q, k, v = queries_keys_values(p, h, heads)                                           # [B, H, n, d]
    A = attention_weights(q, k, 0, temperature)                                          # [B, H, n, n]
    g_o = rearrange(linear_backward(g, p["proj.weight"]), "b n (h d) -> b h n d", h=heads)
    g_v = np.swapaxes(A, -1, -2) @ g_o
    g_S = softmax_backward(A, g_o @ np.swapaxes(v, -1, -2))
    c = 1.0 / (np.sqrt(q.shape[-1]) * temperature)
    g_q = c * (g_S @ k)
    g_k = c * (np.swapaxes(g_S, -1, -2) @ q)
    g_qkv = rearrange(np.stack([g_q, g_k, g_v]), "three b h n d -> b n (three h d)")
    return linear_backward(g_qkv, p["qkv.weight"])


def mlp_backward(p, h, g):
    """Backward of `attention.mlp`: out = W2 GELU(W1 h + b1) + b2, so
    dL/dh = W1^T [GELU'(W1 h + b1) * (W2^T g)]. h, g: [B, n, C] -> [B, n, C]."""
    pre = linear(h, p["main.0.weight"], p["main.0.bias"])                                # [B, n, 4C]
    return linear_backward(gelu_backward(pre, linear_backward(g, p["main.2.weight"])), p["main.0.weight"])


def transformer_layer_backward(p, h, g, heads, temperature=1.0):
    """Backward of `attention.transformer_layer` over a full sequence. h: [B, n, C] the layer's
    input, g: [B, n, C] -> dL/dh.

    Forward: h1 = h + Attn(LN1(h)), out = h1 + MLP(LN2(h1)). The residual connections pass the
    cotangent through unchanged and add each branch's backward:

        g_h1 = g + LN2'(h1)^T MLP'^T g,      dL/dh = g_h1 + LN1'(h)^T Attn'^T g_h1.
    """
    att, ff = sub_params(p, "attention."), sub_params(p, "mlp.")
    n1 = layer_norm(h, att["norm.weight"], att["norm.bias"])
    h1 = h + causal_attention(att, n1, heads, temperature=temperature)
    n2 = layer_norm(h1, ff["norm.weight"], ff["norm.bias"])
    g_h1 = g + layer_norm_backward(h1, ff["norm.weight"], mlp_backward(ff, n2, g))
    return g_h1 + layer_norm_backward(h, att["norm.weight"],
                                      causal_attention_backward(att, n1, g_h1, heads, temperature))


def shift_backward(g):
    """o'_t = o_{t-1}, o'_0 = 0  =>  dL/do_t = g_{t+1} for t < T-1, and 0 for the last token
    (its output is never used). g: [B, T, D] -> [B, T, D]."""
    return np.concatenate([g[:, 1:], np.zeros_like(g[:, :1])], axis=1)


def conditioner_backward(blk: Block, u, y, cfg, g_a, g_m):
    """Backward of `flow.conditioner` over all T tokens (block order). u: [B, T, D];
    g_a, g_m: [B, T, D] the cotangents of the raw (unshifted) a and m -> dL/du: [B, T, D].

    Forward: h_0 = u W_in^T + b_in + pos + class, h_{l+1} = layer_l(h_l), [a, m] = h_L W_out^T + b_out.
    The position and class terms do not depend on u, so

        g_{h_L} = [g_a, g_m] W_out,   g_{h_l} = layer_l'(h_l)^T g_{h_{l+1}},   dL/du = g_{h_0} W_in.
    """
    hs = hidden_states(blk, u, y, cfg)                              # inputs of every layer (and the output)
    g = linear_backward(np.concatenate([g_a, g_m], axis=-1), blk.params["proj_out.weight"])  # [B, T, C]
    for l in reversed(range(cfg.layers)):
        g = transformer_layer_backward(sub_params(blk.params, f"attn_blocks.{l}."), hs[l], g, cfg.heads)
    return linear_backward(g, blk.params["proj_in.weight"])


def block_backward(blk: Block, x, y, cfg, g_z, g_logdet):
    """Backward of `flow.block_forward`. x: [B, T, D] the block's input (image order);
    g_z: [B, T, D] the cotangent of z (image order), g_logdet: [B] that of the log-det -> dL/dx.

    In block order, u = pi(x), (a, m) = shift(conditioner(u)), z = (u - m) exp(-a), logdet = -mean(a):

        direct path:   dz/du = exp(-a)                      ->  g_u  = g_z exp(-a)
        through m:     dz/dm = -exp(-a)                     ->  g_m  = -g_z exp(-a)
        through a:     dz/da = -z,  dlogdet/da = -1/(T D)   ->  g_a  = -g_z z - g_logdet / (T D)

    then g_a, g_m go back through the shift and the transformer into u (conditioner_backward), and
    pi^-1 returns to the image order (the reversal is its own adjoint).
    """
    u = permute(x, blk.reverse)
    a, m = (shift(o) for o in conditioner(blk, u, y, cfg))
    scale = np.exp(-a)
    z = (u - m) * scale
    g_zu = permute(g_z, blk.reverse)
    g_a = -g_zu * z - g_logdet[:, None, None] / (a.shape[1] * a.shape[2])
    g_m = -g_zu * scale
    g_u = g_zu * scale + conditioner_backward(blk, u, y, cfg, shift_backward(g_a), shift_backward(g_m))
    return permute(g_u, blk.reverse)


def prior_nll_backward(z, g):
    """Backward of `logdet.prior_nll` = 0.5 mean(z^2) + const per sample: dL/dz = g z / N.
    z: [B, T, D], g: [B] -> [B, T, D]."""
    return g[:, None, None] * z / (z.shape[1] * z.shape[2])


def patchify_backward(g, patch_size, channels):
    """Patchify only moves values, so its adjoint is its inverse: dL/dx = unpatchify(g).
    g: [B, T, D] -> [B, c, S, S]."""
    return unpatchify(g, patch_size, channels)


def model_backward(params, cfg, x, y, g_z, g_logdet):
    """Backward of `model.forward`. x: [B, c, S, S]; g_z: [B, T, D]; g_logdet: [B] -> dL/dx.

    logdet = sum_b logdet_b, so every block receives the same g_logdet; g_z flows through the
    blocks in reverse order, each needing its own input, which one forward pass recomputes.
    """
    flow_blocks = blocks(params, cfg)
    inputs = [patchify(x, cfg.patch_size)]                                            # block b's input
    for blk in flow_blocks[:-1]:
        inputs.append(block_forward(blk, inputs[-1], y, cfg)[0])
    g = g_z
    for blk, x_b in reversed(list(zip(flow_blocks, inputs))):
        g = block_backward(blk, x_b, y, cfg, g, g_logdet)
    return patchify_backward(g, cfg.patch_size, cfg.channels)


def grad_log_prob(params, cfg, x, y=None):
    """The score grad_x log p(x | y) of each sample: x: [B, c, S, S] -> [B, c, S, S].

    The log-density of the whole sample (not per dimension), with N = T D = S^2 c:

        log p(x | y) = -N * nll_per_dim = -0.5 sum(z^2) + N * logdet - (N/2) log 2 pi,

    so the cotangents are g_z = -z and g_logdet = N; labels y < 0 (or None) use the mean class
    embedding, as in the label-dropped training of conditional models.
    """
    z, _ = forward(params, cfg, x, y)
    N = z.shape[1] * z.shape[2]
    return model_backward(params, cfg, x, y, prior_nll_backward(z, -N * np.ones(len(x))), N * np.ones(len(x)))
