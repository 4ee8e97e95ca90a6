"""Jacobi and GS-Jacobi inversion of a flow block (Liu & Qin 2025, Sec. 3-4; SPEC, "Jacobi and
GS-Jacobi inversion"). NumPy reference; the solver loop itself serves both backends.

In the block's token order, with z: [B, T, D] the block's output, its inverse x solves

    x = F(x),    F(x)_0 = z_0,    F(x)_{t+1} = z_{t+1} * exp(a_t(x_0..x_t)) + m_t(x_0..x_t).

Jacobi iteration x^{k+1} = F(x^k) updates all tokens in one parallel transformer pass. F_{t+1}
depends only on tokens <= t (the causal mask), so if tokens 0..k of x^k are exact, tokens 0..k+1 of
x^{k+1} are: from any start with x^0_0 = z_0, after k iterations the first k + 1 tokens are exact,
and T - 1 iterations give the exact inverse (the sequential sampler takes T - 1 steps too, one
token each; Jacobi wins when far fewer iterations already come close).

GS-Jacobi cuts the tokens into G modules of M = T / G and solves them in turn (Gauss-Seidel over
modules, Jacobi inside). Module [s, e) reads the finished modules through the KV cache:

    its first token x_s comes from the output at s - 1 of the finished previous module (x_0 = z_0);
    an iteration evaluates tokens s..e-2 at their positions, which gives tokens s+1..e-1;
    then, unless it is the last module, the finished tokens pass once more, from the first token
    the last iteration changed: this writes their final keys and values into the cache and gives
    x_e from them. Tokens the last iteration left unchanged already hold final cache rows.

A module runs min(J, M - 1) iterations (M - 1 make it exact) and stops early once
||x^{k+1} - x^k||_2 / (B * D) < eps (Euclidean norm over the module's B * M * D values).
Optionally every iterate is clipped to [-3, 3], as the published code does. Guidance (and its
annealing by position) acts inside every evaluation exactly as in the sequential sampler.
Costs and the strategy format: tarflow_ref/strategy.py.

Shapes: z, x: [B, T, D]; the per-module iterates are [B, M, D].
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .flow import block_params, branch_caches, check_labels, guided_conditioner, permute
from .guidance import Guidance
from .model import check_tokens
from .patchify import unpatchify
from .strategy import BlockPlan, as_strategy

CLAMP = 3.0


@dataclass(frozen=True)
class Ops:
    """The few array operations the solver needs, for NumPy arrays or torch tensors."""
    copy: Callable
    zeros_like: Callable
    exp: Callable
    clip: Callable
    isfinite: Callable
    where: Callable
    norm: Callable          # Euclidean norm of all values -> float
    first_true: Callable    # index of the first True of a 1-D mask, or its length


NUMPY = Ops(np.copy, np.zeros_like, np.exp, np.clip, np.isfinite, np.where, lambda v: float(np.linalg.norm(v)),
            lambda mask: int(np.argmax(mask)) if mask.any() else len(mask))


def initial_guess(u, guess: int, ops: Ops = NUMPY):
    """x^0 for z = u: [B, T, D] (block order): guess 0 -> z, guess 1 -> [z_0, 0, ..., 0]."""
    if guess == 0:
        return ops.copy(u)
    x = ops.zeros_like(u)
    x[:, 0] = u[:, 0]
    return x


def affine_step(u, a, m, clamp: bool, ops: Ops = NUMPY):
    """x = u * exp(a) + m, optionally clipped to [-3, 3]; u, a, m broadcast together.

    A value that overflows restarts at 0: an inf or NaN in a token that is not exact yet would
    reach the exact ones through the attention (a masked weight 0 times NaN is NaN). Exact tokens
    are finite whenever the sequential inverse is, so this never changes a converged result.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        x = u * ops.exp(a) + m
    if clamp:
        x = ops.clip(x, -CLAMP, CLAMP)
    return ops.where(ops.isfinite(x), x, 0.0)


def solve_block(u, evaluate, plan: BlockPlan, ops: Ops = NUMPY, record=None):
    """GS-Jacobi inverse of one block in its token order. u: [B, T, D] (the block's output z).

    evaluate(x_chunk: [B, n, D], start) -> guided (a, m): [B, n, D] at positions start..start+n-1,
    writing those positions into the block's KV caches. record: a diagnostics.BlockRecord or None.
    Returns x: [B, T, D].
    """
    B, T, D = u.shape
    plan.check(T)
    M = T // plan.modules
    x = initial_guess(u, plan.guess, ops)
    watch = plan.tol > 0 or record is not None        # a residual costs a device sync: only when used

    def run(chunk, start):
        if record is not None:
            record.passed(chunk.shape[1])
        return evaluate(chunk, start)

    for i, s in enumerate(range(0, T, M)):
        e = s + M
        changed = None                                # [M - 1]: tokens s+1..e-1 the last iteration changed
        for _ in range(plan.module_iterations(T)):
            a, m = run(x[:, s:e - 1], s)
            new = affine_step(u[:, s + 1:e], a, m, plan.clamp, ops)
            changed = (new != x[:, s + 1:e]).any((0, 2))
            residual = ops.norm(new - x[:, s + 1:e]) / (B * D) if watch else None
            x[:, s + 1:e] = new
            if record is not None:
                record.iteration(i, residual, ops.copy(x[:, s:e]) if record.keep_iterates else None)
            if residual is not None and residual < plan.tol:
                break
        if e < T:
            # cache rows up to the first changed token were computed from the final tokens already
            first = s if changed is None else min(s + 1 + ops.first_true(changed), e - 1)
            a, m = run(x[:, first:e], first)
            x[:, e] = affine_step(u[:, e], a[:, -1], m[:, -1], plan.clamp, ops)
    return x


def block_inverse_gsj(pb, z, y, cfg, reverse: bool, plan: BlockPlan, guidance: Guidance | None = None,
                      record=None):
    """Noise -> data for one block by GS-Jacobi. z: [B, T, D] (image order) -> x: [B, T, D]."""
    u = permute(z, reverse)
    caches = branch_caches(cfg, len(u), u.dtype)

    def evaluate(chunk, start):
        return guided_conditioner(pb, chunk, y, cfg, reverse, start, caches, guidance)
    return permute(solve_block(u, evaluate, plan, NUMPY, record), reverse)


def inverse_gsj(params, cfg, z, y=None, strategy=None, guidance: Guidance | None = None, trace=None):
    """Tokens z: [B, T, D] -> data tokens, blocks N-1..0, each by its plan in `strategy`
    (a Strategy or text for strategy.parse_strategy). trace: a diagnostics.Trace or None."""
    strategy = as_strategy(strategy, cfg)
    check_tokens(z, cfg)
    check_labels(y, cfg.num_classes, len(z))
    for b in reversed(range(cfg.blocks)):
        plan = strategy.block_plan(b, cfg)
        record = None if trace is None else trace.block(b, plan, guidance)
        z = block_inverse_gsj(block_params(params, b), z, y, cfg, b % 2 == 1, plan, guidance, record)
    return z


def sample_gsj(params, cfg, noise, y=None, strategy=None, guidance: Guidance | None = None, trace=None):
    """Noise: [B, T, D] ~ N(0, I) -> image [B, c, S, S], like model.sample but by GS-Jacobi."""
    strategy = as_strategy(strategy, cfg)
    check_tokens(noise, cfg)
    tokens = inverse_gsj(params, cfg, noise * np.sqrt(params["var"]), y, strategy, guidance, trace)
    return unpatchify(tokens, cfg.patch_size, cfg.channels)
