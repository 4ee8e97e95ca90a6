"""Diagnostics of Jacobi and GS-Jacobi inversion (Liu & Qin 2025, Sec. 4; book/checkpoints.md,
"GS-Jacobi strategies"): the per-block metrics IGM and CRM. NumPy; torch_backend/diagnostics.py
computes them for a torch model.

For one flow block, in its token order, let x: [B, T, D] be its input (real data), z its output,
and a, m the shifted affine parameters of the forward pass (so z = (x - m) exp(-a)).
With F the Jacobi map of the block (jacobi.py) and x^0 an initial guess:

    IGM(x^0) = || mean_B( z * exp(a(x^0)) + m(x^0) - x ) ||_F = || mean_B( F(x^0) - x ) ||_F
    CRM      = || mean_B( exp(-a) * x ) ||_F * ||W_a||_2 + ||W_m||_2

||.||_F is the Euclidean norm of the [T, D] batch mean, ||.||_2 the spectral norm (largest singular
value) of W_a = proj_out.weight[:D] and W_m = proj_out.weight[D:], each [D, C]: how strongly the
output of the transformer moves the log-scale and the shift. A small IGM marks a good starting
point; a large CRM marks a "tough" block whose Jacobi iteration converges slowly, so it deserves
GS modules. Both come from one forward pass over a few images.
"""
from dataclasses import dataclass

import numpy as np

from .flow import block_forward, blocks, conditioner, permute, shift
from .jacobi import initial_guess
from .patchify import patchify
from .strategy import GUESSES


def igm(x, z, a0, m0) -> float:
    """IGM from the shifted a0, m0: [B, T, D] of the conditioner evaluated on the guess x^0."""
    return float(np.linalg.norm((z * np.exp(a0) + m0 - x).mean(0)))


def crm(x, a, w_out) -> float:
    """CRM of a block: x, a: [B, T, D] (block order, a shifted), w_out: proj_out.weight [2D, C]."""
    D = x.shape[-1]
    return float(np.linalg.norm((np.exp(-a) * x).mean(0)) * np.linalg.norm(w_out[:D], 2)
                 + np.linalg.norm(w_out[D:], 2))


def block_metrics(x, z, evaluate, w_out):
    """(IGM for each guess in strategy.GUESSES: [2], CRM) of one block.

    x, z: [B, T, D] float64 in block order; evaluate(tokens) -> the raw (a, m) of the block's
    conditioner on tokens [B, T, D], as float64 NumPy (before the shift).
    """
    a, _ = evaluate(x)
    guesses = []
    for g in GUESSES:
        a0, m0 = evaluate(initial_guess(z, g))
        guesses.append(igm(x, z, shift(a0), shift(m0)))
    return np.array(guesses), crm(x, shift(a), w_out)


@dataclass(frozen=True)
class Diagnostics:
    """Per FORWARD block b: igm[b, g] for guess g (0: x0 = z, 1: x0 = [z_0, 0, ..]), crm[b]."""
    igm: np.ndarray        # [N, 2]
    crm: np.ndarray        # [N]

    @classmethod
    def from_blocks(cls, rows):
        """rows: block_metrics of forward blocks 0..N-1, each (igm [2], crm)."""
        igm, crm = zip(*rows)
        return cls(np.array(igm), np.array(crm))


def diagnose(params, cfg, images, y=None) -> Diagnostics:
    """IGM and CRM of every block from a forward pass of images: [B, c, S, S]."""
    z = patchify(np.asarray(images, np.float64), cfg.patch_size)
    rows = []
    for blk in blocks(params, cfg):
        out, _ = block_forward(blk, z, y, cfg)

        def evaluate(tokens, blk=blk):
            return conditioner(blk, tokens, y, cfg)
        rows.append(block_metrics(permute(z, blk.reverse), permute(out, blk.reverse), evaluate,
                                  blk.params["proj_out.weight"]))
        z = out
    return Diagnostics.from_blocks(rows)
