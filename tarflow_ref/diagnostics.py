"""Diagnostics of Jacobi and GS-Jacobi inversion (Liu & Qin 2025, Sec. 4; SPEC, "Jacobi and GS-Jacobi
inversion"): the per-block metrics IGM and CRM, and traces of what a run did.

For one flow block, in its token order, let x: [B, T, D] be its input (real data), z its output,
and a, m the shifted affine parameters of the forward pass (so z = (x - m) exp(-a)).
With F the Jacobi map of the block (tarflow_ref/jacobi.py) and x^0 an initial guess:

    IGM(x^0) = || mean_B( z * exp(a(x^0)) + m(x^0) - x ) ||_F = || mean_B( F(x^0) - x ) ||_F
    CRM      = || mean_B( exp(-a) * x ) ||_F * ||W_a||_2 + ||W_m||_2

||.||_F is the Euclidean norm of the [T, D] batch mean, ||.||_2 the spectral norm (largest singular
value) of W_a = proj_out.weight[:D] and W_m = proj_out.weight[D:], each [D, C]: how strongly the
output of the transformer moves the log-scale and the shift. A small IGM marks a good starting
point; a large CRM marks a "tough" block whose Jacobi iteration converges slowly, so it deserves
GS modules. Both come from one forward pass over a few images: `diagnose` (NumPy, float64) and
`diagnose_torch` (a torch model; the metrics are then computed in float64 NumPy).

A `Trace` records per block and module the residuals ||x^{k+1} - x^k||_2 / (B * D) of every
iteration (optionally the iterates themselves), and counts the tokens and calls that went through
the transformer, for comparison with the cost formula in tarflow_ref/strategy.py.
"""
from dataclasses import dataclass

import numpy as np
import torch

from .flow import block_forward, block_params, conditioner, permute, shift
from .guidance import Guidance, branches
from .jacobi import initial_guess
from .patchify import patchify
from .strategy import BlockPlan, Cost, GUESSES


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
    """IGM and CRM of every block from a forward pass of images: [B, c, S, S] (NumPy)."""
    z = patchify(np.asarray(images, np.float64), cfg.patch_size)
    rows = []
    for b in range(cfg.blocks):
        pb, reverse = block_params(params, b), b % 2 == 1
        out, _ = block_forward(pb, z, y, cfg, reverse)

        def evaluate(tokens):
            return conditioner(pb, tokens, y, cfg, reverse)
        rows.append(block_metrics(permute(z, reverse), permute(out, reverse), evaluate, pb["proj_out.weight"]))
        z = out
    return Diagnostics.from_blocks(rows)


@torch.no_grad()
def block_metrics_torch(block, x, z, y=None):
    """block_metrics of a torch MetaBlock; x, z: [B, T, D] tensors in IMAGE order (x in, z out)."""
    def numpy(t):
        return t.double().cpu().numpy()

    def evaluate(tokens):
        return tuple(numpy(v) for v in block.conditioner(torch.as_tensor(tokens).to(x), y))
    return block_metrics(numpy(block.permute(x)), numpy(block.permute(z)), evaluate,
                         numpy(block.proj_out.weight))


@torch.no_grad()
def diagnose_torch(model, images, y=None) -> Diagnostics:
    """IGM and CRM of every block of a torch TarFlow from a forward pass of images: [B, c, S, S]."""
    z = patchify(images, model.config.patch_size)
    rows = []
    for block in model.blocks:
        out, _ = block(z, y)
        rows.append(block_metrics_torch(block, z, out, y))
        z = out
    return Diagnostics.from_blocks(rows)


class Trace:
    """What a Jacobi / GS-Jacobi run did, keyed by FORWARD block index b (and module index i).

    residuals[(b, i)]   ||x^{k+1} - x^k||_2 / (B * D) after each iteration k of module i
    iterates[(b, i)]    the module's tokens [B, M, D] (block order) after each iteration, if kept
    token_passes[b]     tokens through the transformer, all guidance branches
    steps[b]            transformer calls (sequential steps)
    """

    def __init__(self, keep_iterates: bool = False):
        self.keep_iterates = keep_iterates
        self.plans, self.residuals, self.iterates, self.token_passes, self.steps = {}, {}, {}, {}, {}

    def block(self, b: int, plan: BlockPlan, guidance: Guidance | None = None) -> "BlockRecord":
        self.plans[b] = plan
        self.token_passes[b] = self.steps[b] = 0
        return BlockRecord(self, b, branches(guidance))

    def iterations(self, b: int) -> list:
        """K_i: the iterations each module of block b ran."""
        return [len(self.residuals.get((b, i), [])) for i in range(self.plans[b].modules)]

    def cost(self) -> Cost:
        return Cost(sum(self.token_passes.values()), sum(self.steps.values()))


class BlockRecord:
    """The recorder `jacobi.solve_block` writes to for one block."""

    def __init__(self, trace: Trace, b: int, branches: int):
        self.trace, self.b, self.branches = trace, b, branches
        self.keep_iterates = trace.keep_iterates

    def passed(self, tokens: int):
        self.trace.token_passes[self.b] += tokens * self.branches
        self.trace.steps[self.b] += 1

    def iteration(self, module: int, residual: float, tokens=None):
        self.trace.residuals.setdefault((self.b, module), []).append(residual)
        if tokens is not None:
            self.trace.iterates.setdefault((self.b, module), []).append(tokens)
