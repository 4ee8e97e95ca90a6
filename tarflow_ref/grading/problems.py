"""The seeded problems the checks pose: small flow blocks with weights drawn away from the
initialisation (a fresh block is the identity map, on which a wrong inverse can still pass).

A problem is a causal conditioner f in the block's token order (tarflow_ref/flow.py):

    f(u: [B, n, D]) -> (a, m): [B, n, D],   a_t, m_t depend on u_0..u_t only (position t),

the raw transformer output before the shift, exactly what flow.conditioner computes. A conditional
block gives two such conditioners, the branches of classifier-free guidance (book/checkpoints.md,
"Inverse, guidance and sampling"):
f_cond with the class embedding of label y_i for sample i, f_uncond with the mean class embedding
and the attention temperature tau_u.
"""
from functools import cache

import numpy as np

from ..config import TarFlowConfig
from ..flow import block, conditioner
from ..io.checkpoint import to_numpy
from ..torch_backend.model import TarFlow, randomize_

# 16 tokens of 2 values (a 4x4 two-channel image, patch 1), one layer of width 16 in 2 heads
TOY = TarFlowConfig(image_size=4, patch_size=1, channels=2, width=16, blocks=1, layers=1, num_classes=0,
                    head_dim=8)
# its conditional twin, for guidance: 3 classes
TOY_CLASSES = TOY.replace(num_classes=3)


def random_params(cfg: TarFlowConfig = TOY, seed: int = 0, out_scale: float = 0.5) -> dict:
    """NumPy float64 parameters (released keys) of a TarFlow with weights away from the initialisation."""
    import torch

    return to_numpy(randomize_(TarFlow(cfg).to(torch.float64), seed, out_scale))


def toy_conditioner(seed: int = 0, cfg: TarFlowConfig = TOY):
    """(f, pb): the causal conditioner of block 0 of a random TarFlow, in its own token order, and
    that block's parameters (for the reference functions of flow.py and jacobi.py)."""
    pb = block(random_params(cfg, seed), 0)

    def f(u):
        return conditioner(pb, np.asarray(u, dtype=np.float64), None, cfg)
    return f, pb


def toy_branches(seed: int = 0, labels=(0,), temperature: float = 1.0, cfg: TarFlowConfig = TOY_CLASSES):
    """(f_cond, f_uncond, pb): the two guidance branches of block 0 of a random conditional TarFlow,
    for inputs u: [B, n, D] with B = len(labels) (sample i has label labels[i]; f_uncond attends
    at temperature tau_u), and that block's parameters (for flow.block_inverse with y = labels)."""
    pb = block(random_params(cfg, seed), 0)
    y = np.asarray(labels)

    def f_cond(u):
        return conditioner(pb, np.asarray(u, dtype=np.float64), y, cfg)

    def f_uncond(u):
        return conditioner(pb, np.asarray(u, dtype=np.float64), None, cfg, temperature=temperature)
    return f_cond, f_uncond, pb


def toy_noise(seed: int = 0, batch: int = 2, cfg: TarFlowConfig = TOY):
    """z: [B, T, D] standard normal, seeded. Some random blocks amplify such noise in their inverse
    until it overflows (correctly, and uselessly for a check): each check names the seeds it uses,
    chosen so that the inverse and every iterate stay small."""
    return np.random.default_rng(seed).standard_normal((batch, cfg.tokens, cfg.token_dim))


@cache
def bundled_digits():
    """(model, images: [360, 1, 8, 8] uint8, labels: [360]): the bundled digits TarFlow in float32
    (as the CLI runs it) and the 360 held-out digits, loaded once. Shared: copy the model before
    changing it (e.g. to float64)."""
    from ..assets import bundled_checkpoint
    from ..io.checkpoint import load_checkpoint
    from ..training.data import load_digits_split

    images, labels = load_digits_split("test")
    return load_checkpoint(bundled_checkpoint()).eval(), images, labels
