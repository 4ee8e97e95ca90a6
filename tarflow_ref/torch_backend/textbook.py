"""The textbook sequential sampler: the readable baseline that the engine (engine.py) must equal.

The same inverse as the engine (book/checkpoints.md, "Inverse, guidance and sampling"):

    x_0 = z_0;   x_{t+1} = z_{t+1} * exp(a_t) + m_t,   (a_t, m_t) from tokens 0..t,  t = 0..T-2

written the way the released code does it: one token per step through MetaBlock.conditioner,
keys and values appended to growing caches with torch.cat (copying the whole cache, O(t), every
step), and guidance's conditional and unconditional branches as two separate passes
(tarflow_ref/guidance.py `guided`). Clear and slow: about T * 2 * (20 L) small kernel launches
per block. tests/test_engine.py proves the engine equal to it; benchmarks/sampling.py times both.
"""
import torch

from ..guidance import Guidance, guided
from ..validation import check_labels, check_tokens
from .checks import tensors_of
from .precision import autocast, wide


class GrowingKVCache:
    """Keys and values of the tokens seen so far, for one layer and one branch: [B, H, t, d],
    grown by concatenation (the interface of engine.KVCache; positions must come in order)."""

    def __init__(self):
        self.k = self.v = None

    def write(self, k, v, start):
        """k, v: [B, H, n, d] at positions start..start+n-1 -> keys, values of 0..start+n-1."""
        seen = 0 if self.k is None else self.k.shape[2]
        if start != seen:
            raise ValueError(f"a growing cache appends: expected position {seen}, got {start}")
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


@torch.no_grad()
def block_inverse(block, z, y=None, guidance: Guidance | None = None, steps: int | None = None, *,
                  first: int = 0):
    """Noise -> data for one block. z: [B, T, D] (image order) -> x: [B, T, D].

    `first` starts the loop at step t = first: tokens 0..first of z (in the block's order) must
    already be decoded ones, and one parallel pass over tokens 0..first-1 per branch fills the
    caches. `steps` then decodes only tokens first+1..first+steps. (The benchmark times such
    windows, early and late in the sequence.)
    """
    u = block.permute(z)
    x = u.clone()
    T = u.shape[1]
    if not 0 <= first <= T - 1:
        raise ValueError(f"first must be a position 0..{T - 1} of the {T} tokens, got {first}")
    caches = tuple([GrowingKVCache() for _ in block.attn_blocks] for _ in range(2))  # (conditional, unconditional)
    if first:                  # the keys and values of the decoded prefix; its a, m are not needed
        def prefix(label, cache, temperature):
            return block.conditioner(x[:, :first], label, 0, cache, temperature)
        guided(prefix, y, caches, guidance, torch.arange(first, device=x.device)[:, None], T)
    for t in range(first, T - 1 if steps is None else min(first + steps, T - 1)):
        def branch(label, cache, temperature):
            return block.conditioner(x[:, t:t + 1], label, t, cache, temperature)
        a, m = guided(branch, y, caches, guidance, t, T)
        x[:, t + 1] = u[:, t + 1] * torch.exp(wide(a[:, 0])) + m[:, 0]
    return block.permute(x)


@torch.no_grad()
def inverse(model, z, y=None, guidance: Guidance | None = None, *, bf16=False, progress=None):
    """Tokens z: [B, T, D] -> data tokens, blocks N-1..0 (a sampler of sampling.sample)."""
    tensors = tensors_of(model)
    check_tokens(z, model.config, tensors)
    check_labels(y, model.config.num_classes, len(z), tensors)
    blocks = list(reversed(model.blocks))
    with autocast(z.device, bf16):
        for block in (progress(blocks) if progress else blocks):
            z = block_inverse(block, z, y, guidance)
    return z
