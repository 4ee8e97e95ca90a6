"""The MAF-style affine autoregressive flow block (Zhai et al. 2024, Sec. 2.1-2.2; book/checkpoints.md,
"One flow block" and "Inverse, guidance and sampling"). NumPy reference.

In the block's token order pi (identity for even blocks, reversed for odd ones), u = pi(x).
A causal transformer reads u and predicts, from tokens 0..t, the affine parameters of token
t + 1 (that is the shift by one token; token 0 gets a = m = 0):

    [a_t, m_t] = f(u_0..u_{t-1})                              (a: log-scale, m: shift)
    forward:   z_t = (u_t - m_t) * exp(-a_t)                  all tokens at once
    inverse:   u_t = z_t * exp(a_t) + m_t                      token by token, t = 1..T-1
    log-det:   -mean_{t,d} a_{t,d}      per sample (a mean over the T * D values, not a sum)

The Jacobian dz/du is lower-triangular over tokens with diagonal exp(-a_t), hence the log-det.

Shapes: x, z, u: [B, T, D]; y: [B] labels (< 0 or None: the mean class embedding).
"""
from dataclasses import dataclass

import numpy as np

from .attention import KVCache, linear, sub_params, transformer_layer
from .guidance import Guidance, guided


@dataclass(frozen=True)
class Block:
    """One flow block: its parameters (the 'blocks.{b}.' entries, prefix removed) and its token order."""
    params: dict
    reverse: bool                   # the block reads its tokens in reverse order


def reverses(b: int) -> bool:
    """Odd blocks reverse the token order, so that each block conditions on what the previous one
    could not see. Both backends build their blocks with this rule."""
    return b % 2 == 1


def block(params, b: int) -> Block:
    """Flow block b of the whole model's parameter dict."""
    return Block(sub_params(params, f"blocks.{b}."), reverses(b))


def blocks(params, cfg) -> list:
    """Every flow block, in forward order 0..N-1."""
    return [block(params, b) for b in range(cfg.blocks)]


def permute(x, reverse: bool, axis=1):
    """The block's token order; the reversal is its own inverse."""
    return np.flip(x, axis) if reverse else x


def class_embedding(blk: Block, y, batch):
    """The class term added to every token: [B, 1, C], or 0 for an unconditional model.

    y None, y < 0 and the unconditional branch of guidance all use the mean over classes.
    """
    if "class_embed" not in blk.params:
        return 0.0
    table = blk.params["class_embed"]              # [K, 1, C]
    mean = table.mean(0)                           # [1, C]
    if y is None:
        return np.broadcast_to(mean, (batch,) + mean.shape)
    y = np.asarray(y)
    return np.where((y < 0)[:, None, None], mean, table[np.maximum(y, 0)])


def new_caches(cfg, batch, dtype=np.float64):
    """One KV cache per transformer layer of a block."""
    return [KVCache(batch, cfg.heads, cfg.tokens, cfg.head_dim, dtype) for _ in range(cfg.layers)]


def branch_caches(cfg, batch, dtype=np.float64):
    """(conditional, unconditional): the caches of both guidance branches, for guided_conditioner."""
    return new_caches(cfg, batch, dtype), new_caches(cfg, batch, dtype)


def hidden_states(blk: Block, u, y, cfg, start=0, caches=None, temperature=1.0):
    """[h_0, ..., h_L]: the transformer's hidden states [B, n, C] at positions start..start+n-1,
    h_0 = u W_in^T + b_in + pos + class term, h_{l+1} = layer_l(h_l). The backward pass
    (backward.py) needs every layer's input; the conditioner only the last."""
    p, n = blk.params, u.shape[1]
    pos = permute(p["pos_embed"], blk.reverse, axis=0)[start:start + n]          # [n, C]
    hs = [linear(u, p["proj_in.weight"], p["proj_in.bias"]) + pos + class_embedding(blk, y, u.shape[0])]
    for l in range(cfg.layers):
        hs.append(transformer_layer(sub_params(p, f"attn_blocks.{l}."), hs[-1], cfg.heads, start,
                                    None if caches is None else caches[l], temperature))
    return hs


def conditioner(blk: Block, u, y, cfg, start=0, caches=None, temperature=1.0):
    """The transformer's raw output at positions start..start+n-1 of the block order.

    u: [B, n, D] tokens at those positions (block order). Returns a, m: [B, n, D]; the output
    at position t parametrises token t + 1 (before the shift).
    """
    h = hidden_states(blk, u, y, cfg, start, caches, temperature)[-1]
    o = linear(h, blk.params["proj_out.weight"], blk.params["proj_out.bias"])      # [B, n, 2D]
    D = u.shape[-1]
    return o[..., :D], o[..., D:]


def guided_conditioner(blk: Block, u, y, cfg, start, caches, guidance: Guidance | None = None):
    """`conditioner` with classifier-free guidance; caches = (conditional, unconditional)."""
    def branch(label, cache, temperature):
        return conditioner(blk, u, label, cfg, start, cache, temperature)
    positions = start + np.arange(u.shape[1])[:, None]                               # [n, 1]
    return guided(branch, y, caches, guidance, positions, cfg.tokens)


def shift(o):
    """o'_t = o_{t-1}, o'_0 = 0 along the token axis of o: [B, T, D]."""
    return np.concatenate([np.zeros_like(o[:, :1]), o[:, :-1]], axis=1)


def block_forward(blk: Block, x, y, cfg):
    """Data -> noise for one block. x: [B, T, D] (image order). Returns z: [B, T, D], logdet: [B]."""
    u = permute(x, blk.reverse)
    a, m = conditioner(blk, u, y, cfg)
    a, m = shift(a), shift(m)
    z = (u - m) * np.exp(-a)
    return permute(z, blk.reverse), -a.mean(axis=(1, 2))


def block_inverse(blk: Block, z, y, cfg, guidance: Guidance | None = None):
    """Noise -> data for one block, token by token with a KV cache. z: [B, T, D] (image order)."""
    u = permute(z, blk.reverse)
    x = u.copy()                                   # x_0 = z_0; later tokens are overwritten in turn
    caches = branch_caches(cfg, len(u), u.dtype)
    for t in range(u.shape[1] - 1):
        a, m = guided_conditioner(blk, x[:, t:t + 1], y, cfg, t, caches, guidance)
        x[:, t + 1] = u[:, t + 1] * np.exp(a[:, 0]) + m[:, 0]
    return permute(x, blk.reverse)
