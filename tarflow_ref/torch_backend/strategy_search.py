"""A GS-Jacobi strategy found automatically for a torch TarFlow (Liu & Qin 2025, Sec. 4;
book/checkpoints.md, "GS-Jacobi strategies").

auto_strategy(model, y, guidance, tol, batch): the cheapest strategy whose samples stay within
`tol` (max |x - x_seq| over all image values) of the sequential sampler on a batch of seeded noise:

  1. Sample the batch sequentially, keeping every block's input and output (the reference chain).
  2. IGM and CRM of every block from that chain (tarflow_ref/diagnostics.py): a forward pass of
     the samples reproduces it. Each block starts from the guess with the smaller IGM. Blocks
     whose CRM is at least twice the median ("tough" blocks) may use any G dividing T; the
     others use plain Jacobi (G = 1) or, as the always-exact fallback, G = T (sequential).
  3. Per block, from the reference input, the smallest J whose output is within a per-block
     budget of the reference output, for each allowed G: for G = 1 one run of T - 1 iterations
     shows every J at once; otherwise a binary search over 1..M-1 (assuming the error falls
     with J). The block takes the (G, J) with the fewest steps (sequential transformer calls),
     then the fewest token passes. The budget starts at tol / N.
  4. Sample the batch with the result; if it misses tol (errors grow through later blocks),
     quarter the budget and repeat step 3 (at most 6 rounds; then the sequential strategy).

The search costs one sequential sample of the batch, one Jacobi run per block, and O(log M)
GS-Jacobi runs per tough block and candidate G, per round.
"""
import numpy as np
import torch

from ..guidance import Guidance, check_guidance
from ..strategy import BlockPlan, Strategy, block_cost, divisors
from ..validation import check_labels
from .checks import check_finite_weights, tensors_of
from .diagnostics import block_metrics_torch
from .jacobi import Trace, block_inverse_gsj, inverse_gsj
from .sampling import block_inverse


@torch.no_grad()
def auto_strategy(model, y=None, guidance: Guidance | None = None, tol: float = 1e-3, batch: int = 8,
                  seed: int = 0, safety: float = 10.0) -> Strategy:
    """The strategy with the fewest steps found by the search in the module docstring.

    y: None or labels [B] (their number sets the batch when given). tol: the max abs deviation
    from the sequential samples that is allowed; the search aims at tol / safety on its own batch,
    because the largest error of a batch is heavy-tailed: fresh noise can land several times
    higher than the search batch did.
    """
    cfg = model.config
    if not tol > 0 or not safety >= 1:
        raise ValueError(f"tolerance must be > 0 and safety >= 1, got tol={tol}, safety={safety}")
    if y is not None:
        batch = len(y)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    check_labels(y, cfg.num_classes, batch, tensors_of(model))
    check_guidance(guidance)
    check_finite_weights(model, "searched")
    T, N = cfg.tokens, cfg.blocks
    gen = torch.Generator(device="cpu").manual_seed(seed)
    var = model.var
    noise = torch.randn(batch, T, cfg.token_dim, generator=gen, dtype=torch.float64).to(var) * var.sqrt()

    inputs, outputs = {}, {}                          # the sequential reference chain, per forward block
    z = noise
    for b in reversed(range(N)):
        inputs[b] = z
        outputs[b] = z = block_inverse(model.blocks[b], z, y, guidance)
    reference = z
    if not bool(torch.isfinite(reference).all()):
        raise ValueError("the sequential samples of the search batch are not finite (the model overflows "
                         "on this noise); try another seed")

    metrics = {b: block_metrics_torch(model.blocks[b], outputs[b], inputs[b], y) for b in range(N)}
    crm = np.array([metrics[b][1] for b in range(N)])
    tough = crm >= 2 * np.median(crm)

    target = tol / safety
    budget = target / N
    for _ in range(6):
        plans = {}
        for b in range(N):
            guess = int(np.argmin(metrics[b][0]))
            candidates = [G for G in divisors(T) if G < T] if tough[b] else [1]
            plans[b] = _cheapest_plan(model.blocks[b], inputs[b], outputs[b], y, guidance, guess, candidates,
                                      budget)
        order = list(reversed(range(N)))              # sampling order
        strategy = Strategy([plans[b].modules for b in order], [plans[b].iterations for b in order],
                            [plans[b].guess for b in order])
        if _max_error(inverse_gsj(model, noise, y, guidance, strategy=strategy), reference) <= target:
            return strategy
        budget /= 4
    return Strategy.uniform(N, 0, 1)


def _cheapest_plan(block, z, x_ref, y, guidance, guess, candidates, budget) -> BlockPlan:
    """Fewest steps, then fewest token passes: sequential (always exact), or a candidate G
    (ascending) with its smallest J, searched only below the steps of the best plan so far."""
    T = z.shape[1]
    best_cost, best = block_cost(T, T, [0] * T)[::-1], BlockPlan(T, 1, guess)          # (steps, passes)
    for G in candidates:
        most = min(T // G - 1, (best_cost[0] - G) // G)        # G J + G - 1 < best steps
        plan = _smallest_iterations(block, z, x_ref, y, guidance, G, guess, budget, most) if most >= 1 else None
        if plan is not None:
            cost = block_cost(T, G, [plan.iterations] * G)[::-1]
            if cost < best_cost:
                best_cost, best = cost, plan
    return best


def _smallest_iterations(block, z, x_ref, y, guidance, G, guess, budget, most):
    """The BlockPlan with the smallest J in 1..most within budget; None if none."""
    if G == 1:
        # plain Jacobi: a run of J iterations passes through the result of every shorter run, so
        # runs of 4, 8, 16, .. iterations show every J at under twice the cost of the answer
        target, tried, J = block.permute(x_ref), 0, 4
        while tried < most:
            J = min(J, most)
            trace, plan = Trace(keep_iterates=True), BlockPlan(1, J, guess)
            block_inverse_gsj(block, z, y, plan, guidance, record=trace.block(0, plan))
            for k, x in enumerate(trace.iterates[(0, 0)][tried:], start=tried + 1):
                if _max_error(x, target) <= budget:
                    return BlockPlan(1, k, guess)
            tried, J = J, 2 * J
        return None
    # otherwise the finishing passes depend on J: binary search, assuming the error falls with J

    def within(J):
        return _max_error(block_inverse_gsj(block, z, y, BlockPlan(G, J, guess), guidance), x_ref) <= budget
    if not within(most):                              # (a NaN error fails too)
        return None
    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if within(mid) else (mid + 1, hi)
    return BlockPlan(G, lo, guess)


def _max_error(x, x_ref) -> float:
    return float((x - x_ref).abs().max())
