"""Sequential sampling in torch: the inverse of every block, token by token, with a KV cache
(SPEC, "Inverse"; the NumPy twin is tarflow_ref/flow.py `block_inverse`).

    x_0 = z_0;   x_{t+1} = z_{t+1} * exp(a_t) + m_t,   (a_t, m_t) from tokens 0..t,  t = 0..T-2

with classifier-free guidance (tarflow_ref/guidance.py) and optional bfloat16 autocast on CUDA.
"""
import contextlib

import torch

from ..flow import check_labels
from ..guidance import Guidance, guided
from ..model import check_tokens
from ..patchify import unpatchify
from .model import wide


class KVCache:
    """Keys and values of positions 0..T-1 for one layer and one branch: [B, H, T, d], written in
    place (no concatenation per token). Allocated at the first write, in that write's dtype, so
    the same cache serves float64 tests and bfloat16 autocast."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.k = self.v = None

    def write(self, k, v, start):
        """k, v: [B, H, n, d] at positions start..start+n-1 -> keys, values of 0..start+n-1."""
        if self.k is None:
            shape = (*k.shape[:2], self.tokens, k.shape[-1])
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def new_caches(block, tokens):
    """(conditional, unconditional) caches: one KVCache per transformer layer for each branch."""
    return tuple([KVCache(tokens) for _ in block.attn_blocks] for _ in range(2))


def guided_conditioner(block, x, y, start, caches, guidance: Guidance | None):
    """Guided a, m: [B, n, D] for the tokens x: [B, n, D] at positions start..start+n-1 (block order).

    The one way every torch sampler (sequential, Jacobi, GS-Jacobi) evaluates a block while
    decoding; it writes the keys and values of these positions into `caches`.
    """
    def branch(label, cache, temperature):
        return block.conditioner(x, label, start, cache, temperature)
    positions = start + torch.arange(x.shape[1], device=x.device, dtype=x.dtype)[:, None]  # [n, 1]
    return guided(branch, y, caches, guidance, positions, block.pos_embed.shape[0])


def autocast(device, bf16: bool):
    """bfloat16 autocast on CUDA, as the released evaluation samples; a clear error elsewhere."""
    if not bf16:
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError("bfloat16 autocast is for CUDA; sample in float32 on the CPU")
    return torch.autocast("cuda", dtype=torch.bfloat16)


def block_inverse(block, z, y=None, guidance: Guidance | None = None):
    """Noise -> data for one block. z: [B, T, D] (image order) -> x: [B, T, D]."""
    u = block.permute(z)
    x = u.clone()
    T = u.shape[1]
    caches = new_caches(block, T)
    for t in range(T - 1):
        a, m = guided_conditioner(block, x[:, t:t + 1], y, t, caches, guidance)
        x[:, t + 1] = u[:, t + 1] * torch.exp(wide(a[:, 0])) + m[:, 0]
    return block.permute(x)


@torch.no_grad()
def inverse(model, z, y=None, guidance: Guidance | None = None, bf16=False, progress=None):
    """Tokens z: [B, T, D] -> data tokens, blocks N-1..0. `progress` wraps the block loop (tqdm)."""
    check_tokens(z, model.config)
    check_labels(y, model.config.num_classes, len(z))
    blocks = list(reversed(model.blocks))
    with autocast(z.device, bf16):
        for block in (progress(blocks) if progress else blocks):
            z = block_inverse(block, z, y, guidance)
    return z


@torch.no_grad()
def sample(model, noise, y=None, guidance: Guidance | None = None, bf16=False, progress=None):
    """Noise [B, T, D] ~ N(0, I) -> image [B, c, S, S] (before denoising and clipping)."""
    check_tokens(noise, model.config)
    tokens = inverse(model, noise * model.var.sqrt(), y, guidance, bf16, progress)
    return unpatchify(tokens, model.config.patch_size, model.config.channels)
