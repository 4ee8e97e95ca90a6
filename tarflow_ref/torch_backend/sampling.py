"""Sequential sampling in torch (SPEC, "Inverse"; the NumPy twin is tarflow_ref/flow.py
`block_inverse`): noise -> image through every block's exact inverse, token by token,

    x_0 = z_0;   x_{t+1} = z_{t+1} * exp(a_t) + m_t,   (a_t, m_t) from tokens 0..t,  t = 0..T-2

with classifier-free guidance and optional bfloat16 autocast. It runs on the sampling engine
(engine.py: static KV caches, both guidance branches in one batch, CUDA graphs); the readable
token-by-token loop it is tested against is textbook.py. The block-evaluation primitive of every
torch sampler, `guided_conditioner(block, x_chunk, y, start, caches, guidance)` with
`caches = new_caches(block, T)`, lives in the engine and is re-exported here.
"""
import torch

from ..flow import check_labels
from ..guidance import Guidance
from ..model import check_tokens
from ..patchify import unpatchify
from .engine import Engine, KVCache, autocast, guided_conditioner, new_caches

__all__ = ["sample", "Sampler", "inverse", "block_inverse", "guided_conditioner", "new_caches", "KVCache", "autocast"]


@torch.no_grad()
def block_inverse(block, z, y=None, guidance: Guidance | None = None, bf16=False):
    """Noise -> data for one block. z: [B, T, D] (image order) -> x: [B, T, D]."""
    return Engine([block], len(z), guidance, bf16).inverse(z, y)


@torch.no_grad()
def inverse(model, z, y=None, guidance: Guidance | None = None, bf16=False, progress=None, engine=None):
    """Tokens z: [B, T, D] -> data tokens, blocks N-1..0. `progress` wraps the block loop (tqdm).
    engine: an Engine of this model, batch size and setting to reuse (default: a new one)."""
    check_tokens(z, model.config)
    check_labels(y, model.config.num_classes, len(z))
    engine = engine or Engine(model.blocks, len(z), guidance, bf16)
    return engine.inverse(z, y, progress)


@torch.no_grad()
def sample(model, noise, y=None, guidance: Guidance | None = None, bf16=False, progress=None, *,
           sampler=inverse):
    """Noise [B, T, D] ~ N(0, I) -> image [B, c, S, S] (before denoising and clipping).

    `sampler` is any function with `inverse`'s signature (textbook.inverse: the baseline loop).
    """
    check_tokens(noise, model.config)
    tokens = sampler(model, noise * model.var.sqrt(), y, guidance, bf16, progress)
    return unpatchify(tokens, model.config.patch_size, model.config.channels)


class Sampler:
    """`sample` for many batches of one model and setting, with one Engine per batch size: on
    CUDA its graphs are captured at the first batch of that size, not at every batch.

        draw = Sampler(model, Guidance(2.0), bf16=True)
        images = [draw(noise, y) for noise, y in batches]

    The engines read the model's weights as they are when built (bfloat16 copies with bf16):
    make a new Sampler after changing them.
    """

    def __init__(self, model, guidance: Guidance | None = None, bf16=False):
        self.model, self.guidance, self.bf16 = model, guidance, bf16
        self.engines = {}                                  # batch size -> Engine

    def __call__(self, noise, y=None, progress=None):
        """Noise [B, T, D] ~ N(0, I) -> image [B, c, S, S], as sample(model, noise, y, guidance, bf16)."""
        return sample(self.model, noise, y, self.guidance, self.bf16, progress, sampler=self.inverse)

    def inverse(self, model, z, y, guidance, bf16, progress):
        """sample()'s `sampler`: `inverse` on this Sampler's engine for the batch size of z."""
        batch = len(z)
        if batch not in self.engines:
            self.engines[batch] = Engine(model.blocks, batch, guidance, bf16)
        return inverse(model, z, y, guidance, bf16, progress, self.engines[batch])
