"""The whole TarFlow in NumPy, from a plain dict of arrays (book/checkpoints.md, "State-dict keys and
shapes" and "Inverse, guidance and sampling").

`params` holds the released state-dict keys as NumPy arrays ('var', 'blocks.{b}.proj_in.weight',
...), exactly the tensors of a checkpoint, so `io.checkpoint.to_numpy` is the only conversion
(params.py makes them without torch).

    forward:  x --patchify--> tokens --block 0 .. block N-1--> z,   logdet = sum_b logdet_b
    sample:   noise * sqrt(var) --block N-1 .. block 0 (inverse)--> tokens --unpatchify--> image
"""
import numpy as np

from .flow import block_forward, block_inverse, blocks
from .guidance import Guidance, check_guidance
from .patchify import patchify, unpatchify
from .validation import check_finite_params, check_image, check_labels, check_tokens


def forward(params, cfg, x, y=None):
    """Image x: [B, c, S, S] -> z: [B, T, D] and logdet: [B] (sum over blocks of the mean log-det)."""
    check_image(x, cfg)
    check_labels(y, cfg.num_classes, len(x))
    z = patchify(x, cfg.patch_size)
    logdet = np.zeros(len(x), z.dtype)
    for blk in blocks(params, cfg):
        z, ld = block_forward(blk, z, y, cfg)
        logdet = logdet + ld
    return z, logdet


def inverse(params, cfg, z, y=None, guidance: Guidance | None = None):
    """Tokens z: [B, T, D] -> data tokens [B, T, D], blocks in reverse order, each token by token."""
    check_tokens(z, cfg)
    check_labels(y, cfg.num_classes, len(z))
    check_guidance(guidance)
    for blk in reversed(blocks(params, cfg)):
        z = block_inverse(blk, z, y, cfg, guidance)
    return z


def sample(params, cfg, noise, y=None, guidance: Guidance | None = None, *, sampler=inverse):
    """Noise: [B, T, D] ~ N(0, I) -> image [B, c, S, S] (before denoising and clipping).

    sampler(params, cfg, z, y, guidance) inverts the blocks: `inverse` (sequential, the default)
    or jacobi.gs_jacobi(strategy). Weights that hold NaN or infinity are refused.
    """
    check_tokens(noise, cfg, name="noise")
    check_labels(y, cfg.num_classes, len(noise))
    check_guidance(guidance)
    check_finite_params(params)
    tokens = sampler(params, cfg, noise * np.sqrt(params["var"]), y, guidance)
    return unpatchify(tokens, cfg.patch_size, cfg.channels)
