"""The whole TarFlow in NumPy, from a plain dict of arrays (SPEC, "Whole model" and "Inverse").

`params` holds the released state-dict keys as NumPy arrays ('var', 'blocks.{b}.proj_in.weight',
...), exactly the tensors of a checkpoint, so `checkpoint.to_numpy` is the only conversion.

    forward:  x --patchify--> tokens --block 0 .. block N-1--> z,   logdet = sum_b logdet_b
    sample:   noise * sqrt(var) --block N-1 .. block 0 (inverse)--> tokens --unpatchify--> image
"""
import numpy as np

from .flow import block_forward, block_inverse, block_params, check_labels
from .guidance import Guidance
from .patchify import patchify, unpatchify


def forward(params, cfg, x, y=None):
    """Image x: [B, c, S, S] -> z: [B, T, D] and logdet: [B] (sum over blocks of the mean log-det)."""
    check_image(x, cfg)
    check_labels(y, cfg.num_classes, len(x))
    z = patchify(x, cfg.patch_size)
    logdet = np.zeros(len(x), z.dtype)
    for b in range(cfg.blocks):
        z, ld = block_forward(block_params(params, b), z, y, cfg, reverse=b % 2 == 1)
        logdet = logdet + ld
    return z, logdet


def inverse(params, cfg, z, y=None, guidance: Guidance | None = None):
    """Tokens z: [B, T, D] -> data tokens [B, T, D], blocks in reverse order, each token by token."""
    check_tokens(z, cfg)
    check_labels(y, cfg.num_classes, len(z))
    for b in reversed(range(cfg.blocks)):
        z = block_inverse(block_params(params, b), z, y, cfg, reverse=b % 2 == 1, guidance=guidance)
    return z


def sample(params, cfg, noise, y=None, guidance: Guidance | None = None):
    """Noise: [B, T, D] ~ N(0, I) -> image [B, c, S, S] (before denoising and clipping)."""
    check_tokens(noise, cfg)
    tokens = inverse(params, cfg, noise * np.sqrt(params["var"]), y, guidance)
    return unpatchify(tokens, cfg.patch_size, cfg.channels)


def check_image(x, cfg):
    """ValueError unless x is an image batch [B, c, S, S] of this configuration (NumPy or torch)."""
    want = (cfg.channels, cfg.image_size, cfg.image_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        S, P = x.shape[-1] if x.ndim == 4 else 0, cfg.patch_size
        hint = f" (size {S} is not divisible by the patch {P})" if S % P else ""
        raise ValueError(f"expected images [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(x.shape)}{hint}")


def check_tokens(z, cfg):
    """ValueError unless z is a token batch [B, T, D] of this configuration (NumPy or torch)."""
    want = (cfg.tokens, cfg.token_dim)
    if z.ndim != 3 or tuple(z.shape[1:]) != want:
        raise ValueError(f"expected z of shape [B, {want[0]}, {want[1]}] (T tokens, D values), got {tuple(z.shape)}")
