"""The MAF-style affine autoregressive flow block (Zhai et al. 2024, Sec. 2.1-2.2; SPEC, "One flow
block" and "Inverse"). NumPy reference.

In the block's token order pi (identity for even blocks, reversed for odd ones), u = pi(x).
A causal transformer reads u and predicts, from tokens 0..t, the affine parameters of token
t + 1 (that is the shift by one token; token 0 gets a = m = 0):

    [a_t, m_t] = f(u_0..u_{t-1})                              (a: log-scale, m: shift)
    forward:   z_t = (u_t - m_t) * exp(-a_t)                  all tokens at once
    inverse:   u_t = z_t * exp(a_t) + m_t                      token by token, t = 1..T-1
    log-det:   -mean_{t,d} a_{t,d}      per sample (a mean, not a sum: the SPEC normalisation)

The Jacobian dz/du is lower-triangular over tokens with diagonal exp(-a_t), hence the log-det.
Alternating the order lets later blocks condition on what earlier blocks could not see.
"""
import numpy as np

from .attention import KVCache, linear, sub_params, transformer_layer
from .guidance import Guidance, guided


def block_params(params, b):
    """The parameters of flow block b, with the 'blocks.{b}.' prefix removed."""
    return sub_params(params, f"blocks.{b}.")


def permute(x, reverse: bool, axis=1):
    """The block's token order; the reversal is its own inverse."""
    return np.flip(x, axis) if reverse else x


def check_labels(y, num_classes: int, batch: int):
    """Labels y: [B] ints; y < 0 means 'no label'. Works on NumPy arrays and torch tensors."""
    if y is None:
        return
    if tuple(y.shape) != (batch,):
        raise ValueError(f"labels must have shape [{batch}], got {tuple(y.shape)}")
    if len(y) and int(y.max()) >= num_classes:
        bound = "this model is unconditional, so only labels < 0 are allowed" if num_classes == 0 \
            else f"labels must be < {num_classes} (or < 0 for no label)"
        raise ValueError(f"label {int(y.max())} is out of range: {bound}")


def class_embedding(pb, y, batch):
    """The class term added to every token: [B, 1, C], or 0 for an unconditional model.

    y None, y < 0 and the unconditional branch of guidance all use the mean over classes.
    """
    if "class_embed" not in pb:
        return 0.0
    table = pb["class_embed"]                      # [K, 1, C]
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


def hidden_states(pb, u, y, cfg, reverse, start=0, caches=None, temperature=1.0):
    """[h_0, ..., h_L]: the transformer's hidden states [B, n, C] at positions start..start+n-1,
    h_0 = u W_in^T + b_in + pos + class term, h_{l+1} = layer_l(h_l). The backward pass
    (tarflow_ref/backward.py) needs every layer's input; the conditioner only the last."""
    n = u.shape[1]
    pos = permute(pb["pos_embed"], reverse, axis=0)[start:start + n]                # [n, C]
    hs = [linear(u, pb["proj_in.weight"], pb["proj_in.bias"]) + pos + class_embedding(pb, y, u.shape[0])]
    for l in range(cfg.layers):
        hs.append(transformer_layer(sub_params(pb, f"attn_blocks.{l}."), hs[-1], cfg.heads, start,
                                    None if caches is None else caches[l], temperature))
    return hs


def conditioner(pb, u, y, cfg, reverse, start=0, caches=None, temperature=1.0):
    """The transformer's raw output at positions start..start+n-1 of the block order.

    u: [B, n, D] tokens at those positions (block order). Returns a, m: [B, n, D]; the output
    at position t parametrises token t + 1 (before the shift).
    """
    h = hidden_states(pb, u, y, cfg, reverse, start, caches, temperature)[-1]
    o = linear(h, pb["proj_out.weight"], pb["proj_out.bias"])                       # [B, n, 2D]
    D = u.shape[-1]
    return o[..., :D], o[..., D:]


def guided_conditioner(pb, u, y, cfg, reverse, start, caches, guidance: Guidance | None):
    """`conditioner` with classifier-free guidance; caches = (conditional, unconditional)."""
    def branch(label, cache, temperature):
        return conditioner(pb, u, label, cfg, reverse, start, cache, temperature)
    positions = start + np.arange(u.shape[1])[:, None]                               # [n, 1]
    return guided(branch, y, caches, guidance, positions, cfg.tokens)


def shift(o):
    """o'_t = o_{t-1}, o'_0 = 0 along the token axis of o: [B, T, D]."""
    return np.concatenate([np.zeros_like(o[:, :1]), o[:, :-1]], axis=1)


def block_forward(pb, x, y, cfg, reverse):
    """Data -> noise for one block. x: [B, T, D] (image order). Returns z: [B, T, D], logdet: [B]."""
    u = permute(x, reverse)
    a, m = conditioner(pb, u, y, cfg, reverse)
    a, m = shift(a), shift(m)
    z = (u - m) * np.exp(-a)
    return permute(z, reverse), -a.mean(axis=(1, 2))


def block_inverse(pb, z, y, cfg, reverse, guidance: Guidance | None = None):
    """Noise -> data for one block, token by token with a KV cache. z: [B, T, D] (image order)."""
    u = permute(z, reverse)
    x = u.copy()                                   # x_0 = z_0; later tokens are overwritten in turn
    caches = branch_caches(cfg, len(u), u.dtype)
    for t in range(u.shape[1] - 1):
        a, m = guided_conditioner(pb, x[:, t:t + 1], y, cfg, reverse, t, caches, guidance)
        x[:, t + 1] = u[:, t + 1] * np.exp(a[:, 0]) + m[:, 0]
    return permute(x, reverse)
