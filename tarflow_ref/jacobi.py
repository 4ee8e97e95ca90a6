"""Jacobi and GS-Jacobi inversion of a flow block (Liu & Qin 2025, Sec. 3-4; book/checkpoints.md,
"GS-Jacobi strategies"). NumPy reference: the plain algorithm.

In the block's token order, with z: [B, T, D] the block's output, its inverse x solves

    x = F(x),    F(x)_0 = z_0,    F(x)_{t+1} = z_{t+1} * exp(a_t(x_0..x_t)) + m_t(x_0..x_t).

Jacobi iteration x^{k+1} = F(x^k) updates all tokens in one parallel transformer pass. F_{t+1}
depends only on tokens <= t (the causal mask), so if tokens 0..k of x^k are exact, tokens 0..k+1 of
x^{k+1} are: after k iterations the first k + 1 tokens are exact, and T - 1 give the exact inverse.

GS-Jacobi cuts the tokens into G modules of M = T / G and solves them in turn (Gauss-Seidel over
modules, Jacobi inside). Module [s, s + M) reads the finished modules through the KV cache; an
iteration evaluates its tokens s..s+M-2 at their positions, which gives tokens s+1..s+M-1, and a
module is exact after M - 1 iterations, so min(J, M - 1) run. A finished module then passes once
more: that writes its final keys and values into the cache and gives the first token of the next
module. G = T is the sequential sampler, G = 1 plain Jacobi. Optionally every iterate is clipped
to [-3, 3], as the published code does; guidance acts inside every evaluation, as in the
sequential sampler. Strategies and their cost: strategy.py; the fast path (early stopping, fewer
finishing passes, traces): torch_backend/jacobi.py.
"""
import numpy as np

from .flow import Block, blocks, branch_caches, guided_conditioner, permute
from .guidance import Guidance, check_guidance
from .strategy import BlockPlan
from .strategy_text import as_strategy
from .validation import check_labels, check_tokens

CLAMP = 3.0


def initial_guess(u, guess: int):
    """x^0 for z = u: [B, T, D] (block order): guess 0 -> z, guess 1 -> [z_0, 0, ..., 0]."""
    x = u.copy()
    if guess == 1:
        x[:, 1:] = 0.0
    return x


def affine_step(u, a, m, clamp: bool):
    """x = u * exp(a) + m, optionally clipped to [-3, 3]; u, a, m broadcast together.

    A value that overflows restarts at 0: an inf or NaN in a token that is not exact yet would
    reach the exact ones through the attention (a masked weight 0 times NaN is NaN). Exact tokens
    are finite whenever the sequential inverse is, so this never changes a converged result.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        x = u * np.exp(a) + m
    if clamp:
        x = np.clip(x, -CLAMP, CLAMP)
    return np.where(np.isfinite(x), x, 0.0)


def solve_block(u, evaluate, plan: BlockPlan):
    """GS-Jacobi inverse of one block in its token order. u: [B, T, D] (the block's output z).

    evaluate(x_chunk: [B, n, D], start) -> (a, m): [B, n, D], the conditioner at positions
    start..start+n-1, writing them into the block's KV caches. Returns x: [B, T, D].
    """
    if plan.tol:
        raise ValueError("the reference runs every iteration: early stopping (tol > 0) is the fast path's "
                         "(torch_backend.jacobi)")
    T = u.shape[1]
    plan.check(T)
    M = T // plan.modules
    x = initial_guess(u, plan.guess)
    for s in range(0, T, M):                                           # the modules in turn
        for _ in range(plan.module_iterations(T)):                     # Jacobi iterations inside one
            a, m = evaluate(x[:, s:s + M - 1], s)
            x[:, s + 1:s + M] = affine_step(u[:, s + 1:s + M], a, m, plan.clamp)
        if s + M < T:                                                  # final cache rows, next module's x_s
            a, m = evaluate(x[:, s:s + M], s)
            x[:, s + M] = affine_step(u[:, s + M], a[:, -1], m[:, -1], plan.clamp)
    return x


def block_inverse_gsj(blk: Block, z, y, cfg, plan: BlockPlan, guidance: Guidance | None = None):
    """Noise -> data for one block by GS-Jacobi. z: [B, T, D] (image order) -> x: [B, T, D]."""
    u = permute(z, blk.reverse)
    caches = branch_caches(cfg, len(u), u.dtype)

    def evaluate(chunk, start):
        return guided_conditioner(blk, chunk, y, cfg, start, caches, guidance)
    return permute(solve_block(u, evaluate, plan), blk.reverse)


def inverse_gsj(params, cfg, z, y=None, guidance: Guidance | None = None, *, strategy):
    """Tokens z: [B, T, D] -> data tokens, blocks N-1..0, each by its plan in `strategy` (a Strategy
    or text for strategy_text.parse_strategy)."""
    strategy = as_strategy(strategy, cfg)
    check_tokens(z, cfg)
    check_labels(y, cfg.num_classes, len(z))
    check_guidance(guidance)
    for b, blk in reversed(list(enumerate(blocks(params, cfg)))):
        z = block_inverse_gsj(blk, z, y, cfg, strategy.block_plan(b, cfg), guidance)
    return z


def gs_jacobi(strategy):
    """The GS-Jacobi sampler of model.sample: sample(params, cfg, noise, y, guidance, sampler=gs_jacobi(s))."""
    def sampler(params, cfg, z, y=None, guidance: Guidance | None = None):
        return inverse_gsj(params, cfg, z, y, guidance, strategy=strategy)
    return sampler
