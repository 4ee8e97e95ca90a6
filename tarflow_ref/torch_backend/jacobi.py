"""GS-Jacobi sampling in torch: the fast path of jacobi.py's plain loop (Liu & Qin 2025, Sec. 3-4;
book/checkpoints.md, "GS-Jacobi strategies"). Every evaluation goes through the engine's
`guided_conditioner` on static caches, the path of the sequential sampler.

The loop is jacobi.block_inverse_gsj's, with three additions that leave a converged result as it
is (tests/test_jacobi.py holds the two equal to 1e-12 in float64 on every strategy form):

* early stop: a module stops once ||x^{k+1} - x^k||_2 / (B * D) < eps (the plan's tol; the
  Euclidean norm over the module's B * M * D values);
* a module's finishing pass starts at the first token its last iteration changed: the cache rows
  before it already hold the final tokens' keys and values (strategy.py counts this saving);
* a Trace records the residuals, the iterates if asked, and the tokens and calls that went through
  the transformer.

Shapes: z, x: [B, T, D]; the per-module iterates are [B, M, D].
"""
import torch

from ..guidance import Guidance, branches, check_guidance
from ..jacobi import CLAMP
from ..strategy import BlockPlan, Cost
from ..strategy_text import as_strategy
from ..validation import check_labels, check_tokens
from .checks import tensors_of
from .engine import guided_conditioner, new_caches
from .precision import autocast, wide
from .sampling import sample


class Trace:
    """What a GS-Jacobi run did, keyed by FORWARD block index b (and module index i).

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
    """The recorder `solve_block` writes to for one block."""

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


def initial_guess(u, guess: int):
    """jacobi.initial_guess: guess 0 -> z, guess 1 -> [z_0, 0, ..., 0]."""
    x = u.clone()
    if guess == 1:
        x[:, 1:] = 0.0
    return x


def affine_step(u, a, m, clamp: bool):
    """jacobi.affine_step: u * exp(a) + m, optionally clipped; an overflowing value restarts at 0."""
    x = u * torch.exp(wide(a)) + m
    if clamp:
        x = torch.clamp(x, -CLAMP, CLAMP)
    return torch.where(torch.isfinite(x), x, 0.0)


def first_changed(changed) -> int:
    """Index of the first True of a 1-D mask, or its length."""
    return int(changed.to(torch.uint8).argmax()) if bool(changed.any()) else len(changed)


def solve_block(u, evaluate, plan: BlockPlan, record: BlockRecord | None = None):
    """GS-Jacobi inverse of one block in its token order. u: [B, T, D] (the block's output z).

    evaluate(x_chunk: [B, n, D], start) -> guided (a, m): [B, n, D] at positions start..start+n-1,
    writing those positions into the block's KV caches. Returns x: [B, T, D].
    """
    B, T, D = u.shape
    plan.check(T)
    M = T // plan.modules
    x = initial_guess(u, plan.guess)
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
            new = affine_step(u[:, s + 1:e], a, m, plan.clamp)
            changed = (new != x[:, s + 1:e]).any((0, 2))
            residual = float(torch.linalg.vector_norm(new - x[:, s + 1:e])) / (B * D) if watch else None
            x[:, s + 1:e] = new
            if record is not None:
                record.iteration(i, residual, x[:, s:e].clone() if record.keep_iterates else None)
            if residual is not None and residual < plan.tol:
                break
        if e < T:
            first = s if changed is None else min(s + 1 + first_changed(changed), e - 1)
            a, m = run(x[:, first:e], first)
            x[:, e] = affine_step(u[:, e], a[:, -1], m[:, -1], plan.clamp)
    return x


@torch.no_grad()
def block_inverse_gsj(block, z, y, plan: BlockPlan, guidance: Guidance | None = None, *,
                      record: BlockRecord | None = None):
    """Noise -> data for one block by GS-Jacobi. z: [B, T, D] (image order) -> x: [B, T, D]."""
    u = block.permute(z)
    caches = new_caches(block, u.shape[1])

    def evaluate(chunk, start):
        return guided_conditioner(block, chunk, y, start, caches, guidance)
    return block.permute(solve_block(u, evaluate, plan, record))


@torch.no_grad()
def inverse_gsj(model, z, y=None, guidance: Guidance | None = None, *, strategy, bf16=False, progress=None,
                trace: Trace | None = None):
    """Tokens z: [B, T, D] -> data tokens, blocks N-1..0 by `strategy` (a Strategy or text for
    strategy_text.parse_strategy). `progress` wraps the block loop (tqdm)."""
    cfg = model.config
    strategy = as_strategy(strategy, cfg)
    tensors = tensors_of(model)
    check_tokens(z, cfg, tensors)
    check_labels(y, cfg.num_classes, len(z), tensors)
    check_guidance(guidance)
    order = list(reversed(range(cfg.blocks)))
    with autocast(z.device, bf16):
        for b in (progress(order) if progress else order):
            plan = strategy.block_plan(b, cfg)
            record = None if trace is None else trace.block(b, plan, guidance)
            z = block_inverse_gsj(model.blocks[b], z, y, plan, guidance, record=record)
    return z


def gs_jacobi(strategy, trace: Trace | None = None):
    """The GS-Jacobi sampler of sampling.sample. strategy: a Strategy, text, or 'auto'
    (strategy_search.auto_strategy on a small batch of the model first, same labels and guidance)."""
    def sampler(model, z, y=None, guidance: Guidance | None = None, *, bf16=False, progress=None):
        chosen = strategy
        if isinstance(strategy, str) and strategy.strip() == "auto":
            from .strategy_search import auto_strategy

            check_labels(y, model.config.num_classes, len(z), tensors_of(model))   # before the search, not after it
            chosen = auto_strategy(model, y, guidance)
        return inverse_gsj(model, z, y, guidance, strategy=chosen, bf16=bf16, progress=progress, trace=trace)
    return sampler


def sample_gsj(model, noise, y=None, strategy=None, guidance: Guidance | None = None, *, bf16=False,
               progress=None, trace: Trace | None = None):
    """sample(model, noise, y, guidance, sampler=gs_jacobi(strategy, trace)): noise -> image by GS-Jacobi."""
    return sample(model, noise, y, guidance, sampler=gs_jacobi(strategy, trace), bf16=bf16, progress=progress)
