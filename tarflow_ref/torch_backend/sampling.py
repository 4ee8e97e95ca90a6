"""Sampling in torch (book/checkpoints.md, "Inverse, guidance and sampling"; the NumPy twin is
model.sample): noise -> image through the inverse of every block,

    image = unpatchify(inverse(noise * sqrt(var))),

where the sampler that inverts the blocks is a choice: the sequential inverse on the sampling
engine (engine.py, the default), GS-Jacobi (jacobi.gs_jacobi(strategy)), or the readable loop the
engine is tested against (textbook.inverse). A sampler is any function
sampler(model, z, y, guidance, bf16=..., progress=...) -> tokens.
"""
import torch

from ..guidance import Guidance, check_guidance
from ..patchify import unpatchify
from ..validation import check_labels, check_tokens
from .checks import check_finite_weights, tensors_of
from .engine import Engine


@torch.no_grad()
def block_inverse(block, z, y=None, guidance: Guidance | None = None, bf16=False):
    """Noise -> data for one block. z: [B, T, D] (image order) -> x: [B, T, D]."""
    return Engine([block], len(z), guidance, bf16).inverse(z, y)


@torch.no_grad()
def inverse(model, z, y=None, guidance: Guidance | None = None, *, bf16=False, progress=None, engine=None):
    """Tokens z: [B, T, D] -> data tokens, blocks N-1..0, sequentially. `progress` wraps the block
    loop (tqdm). engine: an Engine of this model, batch size and setting to reuse (default: a new one)."""
    tensors = tensors_of(model)
    check_tokens(z, model.config, tensors)
    check_labels(y, model.config.num_classes, len(z), tensors)
    check_guidance(guidance)
    engine = engine or Engine(model.blocks, len(z), guidance, bf16)
    return engine.inverse(z, y, progress)


@torch.no_grad()
def sample(model, noise, y=None, guidance: Guidance | None = None, *, sampler=inverse, bf16=False, progress=None):
    """Noise [B, T, D] ~ N(0, I) -> image [B, c, S, S] (before denoising and clipping). A model
    with NaN or infinite weights is refused (checks.py)."""
    tensors = tensors_of(model)
    check_tokens(noise, model.config, tensors, "noise")
    check_labels(y, model.config.num_classes, len(noise), tensors)
    check_guidance(guidance)
    check_finite_weights(model)
    tokens = sampler(model, noise * model.var.sqrt(), y, guidance, bf16=bf16, progress=progress)
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
        """Noise [B, T, D] ~ N(0, I) -> image [B, c, S, S], as sample(model, noise, y, guidance)."""
        return sample(self.model, noise, y, self.guidance, sampler=self.inverse, bf16=self.bf16, progress=progress)

    def inverse(self, model, z, y, guidance, *, bf16, progress):
        """The sampler: `inverse` on this Sampler's engine for the batch size of z."""
        batch = len(z)
        if batch not in self.engines:
            self.engines[batch] = Engine(model.blocks, batch, guidance, bf16)
        return inverse(model, z, y, guidance, bf16=bf16, progress=progress, engine=self.engines[batch])
