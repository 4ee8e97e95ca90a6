"""Jacobi and GS-Jacobi inversion: the plain NumPy reference (tarflow_ref/jacobi.py) and the fast
path (torch_backend/jacobi.py) against independent references, on random small models with
weights away from the initialisation:

* enough iterations == the sequential inverse (float64, relative error < 1e-9), with and without
  guidance (plain, annealed, by temperature);
* plain Jacobi is exact after T - 1 iterations and not after T - 2; after k iterations exactly
  the first k + 1 tokens are exact (the triangular structure);
* unconverged, the KV-cache solvers equal a brute-force GS-Jacobi that recomputes the whole
  sequence without any cache (so module boundaries and cache rows are right), also when the
  fast path stops early;
* the fast path equals the plain reference to 1e-12 in float64 on every strategy form (list,
  compact, presets, G = 1, G = T, guesses 0 and 1, clamp on and off, guidance);
* the tokens and calls counted at the transformer equal the cost formula;
* bad strategies and inputs fail with clear messages before any transformer pass;
* the automatic strategy meets its tolerance; bfloat16 autocast (CPU, and CUDA when present)
  matches the bfloat16 sequential sampler.
"""
import numpy as np
import pytest
import torch

import tarflow_ref.flow as flow
import tarflow_ref.jacobi as jacobi
from tarflow_ref import Guidance, TarFlowConfig, model as np_model, sample
from tarflow_ref.flow import Block, block, guided_conditioner, new_caches, permute
from tarflow_ref.strategy import PRESETS, BlockPlan, Strategy, block_cost
from tarflow_ref.strategy_text import parse_strategy
from tarflow_ref.torch_backend import engine, jacobi as tj, sampling
from tarflow_ref.torch_backend.strategy_search import auto_strategy

from conftest import SMALL_CONFIGS, make_model

NAMES = list(SMALL_CONFIGS)
GUIDANCE = {
    "none": None,
    "ab": Guidance(1.5, "ab"),
    "a-annealed": Guidance(2.0, "a", annealed=True),
    "b-tau": Guidance(0.8, "b", temperature=0.6),
    "ab-annealed-tau": Guidance(1.5, "ab", annealed=True, temperature=0.6),
}
# eight blocks of 64 tokens: the published presets apply, and their J leave plain Jacobi unconverged
EIGHT_BLOCKS = TarFlowConfig(image_size=8, patch_size=1, channels=1, width=16, blocks=8, layers=1, num_classes=3,
                             head_dim=8)


def setup(name, seed=3, batch=3, cfg=None, out_scale=0.2):
    """cfg, torch model (float64), NumPy params, noise z [B, T, D], labels (NumPy, torch)."""
    cfg = cfg or SMALL_CONFIGS[name]
    # out_scale 0.2: far from the identity, yet the sequential inverse of these random models stays finite
    model, params = make_model(cfg, seed=seed, out_scale=out_scale)
    z = np.random.default_rng(seed).standard_normal((batch, cfg.tokens, cfg.token_dim))
    y = np.array([cfg.num_classes - 1, -1, 0][:batch]) if cfg.conditional else None
    return cfg, model, params, z, (y, None if y is None else torch.from_numpy(y))


def rel_err(got, want):
    got = got.numpy() if isinstance(got, torch.Tensor) else got
    return np.abs(got - want).max() / np.abs(want).max()


def brute_force_gsj(blk: Block, z, y, cfg, modules, iterations, guess, guidance=None, clamp=False):
    """GS-Jacobi straight from its definition, re-evaluating the whole sequence (no cache reuse).

    iterations: one count per module. F(x)_0 = z_0, F(x)_{t+1} = z_{t+1} exp(a_t(x)) + m_t(x).
    """
    u = permute(z, blk.reverse)
    T = u.shape[1]
    M = T // modules

    def F(x):
        caches = (new_caches(cfg, len(x)), new_caches(cfg, len(x)))
        a, m = guided_conditioner(blk, x, y, cfg, 0, caches, guidance)
        out = np.concatenate([u[:, :1], u[:, 1:] * np.exp(a[:, :-1]) + m[:, :-1]], axis=1)
        return np.clip(out, -3, 3) if clamp else out

    x = u.copy() if guess == 0 else np.concatenate([u[:, :1], np.zeros_like(u[:, 1:])], axis=1)
    for i, s in enumerate(range(0, T, M)):
        if s > 0:
            x[:, s] = F(x)[:, s]                 # from the finished previous module
        for _ in range(iterations[i]):
            x[:, s + 1:s + M] = F(x)[:, s + 1:s + M]
    return permute(x, blk.reverse)


# ---------------------------------------------------------------- the plain reference: exactness and theory

@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("name", NAMES)
def test_plain_jacobi_is_exact_after_T_minus_1_iterations_and_not_before(name, guidance):
    cfg, _, params, z, (y, _) = setup(name)
    g = GUIDANCE[guidance]
    T = cfg.tokens
    blk = block(params, cfg.blocks - 1)                    # the block the sampler inverts first
    exact = flow.block_inverse(blk, z, y, cfg, g)
    full = jacobi.block_inverse_gsj(blk, z, y, cfg, BlockPlan(1, T - 1), g)
    short = jacobi.block_inverse_gsj(blk, z, y, cfg, BlockPlan(1, T - 2), g)
    more = jacobi.block_inverse_gsj(blk, z, y, cfg, BlockPlan(1, 10 * T), g)   # capped at T - 1
    assert rel_err(full, exact) < 1e-9
    assert np.array_equal(more, full)
    assert rel_err(short, exact) > 1e-11                   # far above the rounding of an exact result


@pytest.mark.parametrize("guess", [0, 1])
@pytest.mark.parametrize("name", ["cond-even-P2", "cond-odd-P1-gray"])
def test_after_k_iterations_the_first_k_plus_1_tokens_are_exact(name, guess):
    cfg, _, params, z, (y, _) = setup(name)
    blk = block(params, 0)                                 # block 0: identity token order
    exact = flow.block_inverse(blk, z, y, cfg)
    for k in range(1, cfg.tokens):
        x = jacobi.block_inverse_gsj(blk, z, y, cfg, BlockPlan(1, k, guess))
        error = np.abs(x - exact).max(axis=(0, 2))          # per token
        assert error[:k + 1].max() < 1e-13 * np.abs(exact).max()
        if k + 1 < cfg.tokens:
            assert error[k + 1] > 1e-11 * np.abs(exact).max()  # the next token is not exact yet


@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("name", NAMES)
def test_gs_jacobi_equals_the_sequential_inverse(name, guidance):
    cfg, _, params, z, (y, _) = setup(name)
    g = GUIDANCE[guidance]
    T, N = cfg.tokens, cfg.blocks
    sequential = np_model.inverse(params, cfg, z, y, g)
    for modules in (1, 2, T // 2, T, 0):
        for guess in (0, 1):
            strategy = Strategy.uniform(N, modules, T, guess)
            assert rel_err(jacobi.inverse_gsj(params, cfg, z, y, g, strategy=strategy), sequential) < 1e-9
    mixed = Strategy(([2, 0, 4] * N)[:N], ([T, 1, T] * N)[:N], ([1, 0, 0] * N)[:N])
    assert rel_err(jacobi.inverse_gsj(params, cfg, z, y, g, strategy=mixed), sequential) < 1e-9
    # the image-level entry point: noise * sqrt(var) first, the sampler then unpatchify
    gsj = np_model.sample(params, cfg, z, y, g, sampler=jacobi.gs_jacobi(mixed))
    assert rel_err(gsj, np_model.sample(params, cfg, z, y, g)) < 1e-9


@pytest.mark.parametrize("guidance", ["none", "a-annealed"])
@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_unconverged_gs_jacobi_equals_the_brute_force_definition(name, clamp, guidance):
    cfg, _, params, z, (y, _) = setup(name)
    g = GUIDANCE[guidance]
    T = cfg.tokens
    for b in range(cfg.blocks):
        blk = block(params, b)
        for modules, J in ((1, 2), (2, 1), (2, T // 2 - 2), (T // 2, 1), (T, 1)):
            M = T // modules
            if J < 1 or (J > M - 1 and M > 1):
                continue
            plan = BlockPlan(modules, J, guess=b % 2, clamp=clamp)
            got = jacobi.block_inverse_gsj(blk, z, y, cfg, plan, g)
            want = brute_force_gsj(blk, z, y, cfg, modules, [min(J, M - 1)] * modules, b % 2, g, clamp)
            assert np.abs(got - want).max() < 1e-11 * np.abs(want).max(), (b, modules, J)


def test_clamping_keeps_iterates_in_range():
    cfg, _, params, z, (y, _) = setup("cond-even-P2")
    blk = block(params, 0)
    exact = flow.block_inverse(blk, z, y, cfg)
    assert np.abs(exact[:, 1:]).max() > 3                  # so clamping must change something
    clamped = jacobi.block_inverse_gsj(blk, z, y, cfg, BlockPlan(1, cfg.tokens - 1, clamp=True))
    assert np.abs(clamped[:, 1:]).max() <= 3               # token 0 is z_0, never an iterate
    assert np.array_equal(clamped[:, 0], z[:, 0])
    assert rel_err(clamped, exact) > 1e-3


def test_an_overflowing_iterate_restarts_at_zero():
    u = np.array([[[1.0, 2.0], [3.0, -1.0]]])                      # [B=1, n=2, D=2]
    a = np.array([[[0.5, 800.0], [-1.0, 900.0]]])                  # exp(800) overflows float64
    m = np.full_like(u, 0.25)
    for x in (jacobi.affine_step(u, a, m, clamp=False),
              tj.affine_step(torch.from_numpy(u), torch.from_numpy(a), torch.from_numpy(m), clamp=False).numpy()):
        assert np.array_equal(x[..., 0], u[..., 0] * np.exp(a[..., 0]) + 0.25)
        assert np.array_equal(x[..., 1], [[0.0, 0.0]])


def test_the_reference_runs_every_iteration():
    cfg, _, params, z, (y, _) = setup("cond-even-P2")
    with pytest.raises(ValueError, match=r"early stopping \(tol > 0\) is the fast path's"):
        jacobi.block_inverse_gsj(block(params, 0), z, y, cfg, BlockPlan(2, 3, tol=1e-3))


# ---------------------------------------------------------------- the fast path equals the plain reference

def strategy_forms(cfg):
    """{name: strategy} covering every form: list (with G = 0, the paper's spelling of G = T) and
    compact text, G = 1, G = T, both guesses, clamp on and off."""
    T, N = cfg.tokens, cfg.blocks
    forms = {
        "list clamp": f"G={([2, 0, 4] * N)[:N]} J={([3, 1, 2] * N)[:N]} guess={([1, 0, 1] * N)[:N]} clamp",
        "G=1 guess 0": Strategy.uniform(N, 1, 2, 0),
        "G=1 guess 1 clamp": Strategy.uniform(N, 1, 3, 1, clamp=True),
        "G=T": Strategy.uniform(N, T, 1, 0),
    }
    if N > 1:
        forms["compact"] = f"[{N - 1}-4-2-3] guess=" + str([1] + [0] * (N - 1))
    return forms


def assert_fast_equals_plain(cfg, model, params, z, y, ty, strategy, g):
    want = jacobi.inverse_gsj(params, cfg, z, y, g, strategy=strategy)
    got = tj.inverse_gsj(model, torch.from_numpy(z), ty, g, strategy=strategy).numpy()
    assert np.abs(got - want).max() <= 1e-12 * max(1.0, np.abs(want).max()), strategy
    return want


@pytest.mark.parametrize("guidance", ["none", "ab-annealed-tau"])
@pytest.mark.parametrize("name", NAMES)
def test_fast_path_equals_the_plain_reference_on_every_form(name, guidance):
    cfg, model, params, z, (y, ty) = setup(name)
    g = GUIDANCE[guidance]
    sequential = np_model.inverse(params, cfg, z, y, g)
    unconverged = 0
    for strategy in strategy_forms(cfg).values():
        want = assert_fast_equals_plain(cfg, model, params, z, y, ty, strategy, g)
        unconverged += rel_err(want, sequential) > 1e-6          # so that the comparison is not trivial
    assert unconverged >= 2


@pytest.mark.parametrize("preset", sorted({p.name for p in PRESETS.values()}))
def test_fast_path_equals_the_plain_reference_on_the_presets(preset):
    # out_scale 0.1: unconverged iterates stay finite through eight blocks
    cfg, model, params, z, (y, ty) = setup(None, cfg=EIGHT_BLOCKS, out_scale=0.1)
    strategy = parse_strategy(preset, cfg)
    want = assert_fast_equals_plain(cfg, model, params, z, y, ty, strategy, PRESETS[preset].guidance)
    assert rel_err(want, np_model.inverse(params, cfg, z, y, PRESETS[preset].guidance)) > 1e-9


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_stopped_early_equals_the_brute_force_definition(name):
    cfg, model, params, z, (y, ty) = setup(name)
    T = cfg.tokens
    b = cfg.blocks - 1
    plan = BlockPlan(2, T, tol=1e-4)
    trace = tj.Trace()
    got = tj.block_inverse_gsj(model.blocks[b], torch.from_numpy(z), ty, plan, record=trace.block(b, plan)).numpy()
    K = trace.iterations(b)
    assert min(K) >= 1 and max(K) <= T // 2 - 1
    for i, k in enumerate(K):
        residuals = trace.residuals[(b, i)]
        assert residuals[-1] < 1e-4 or k == T // 2 - 1
        assert all(r >= 1e-4 for r in residuals[:-1])
    want = brute_force_gsj(block(params, b), z, y, cfg, 2, K, 0)
    assert np.abs(got - want).max() < 1e-11 * np.abs(want).max()


# ---------------------------------------------------------------- counting the transformer's work

def counting(monkeypatch, module, name):
    """Wrap module.name (a conditioner) to count its calls and the tokens x samples it is given."""
    seen = {"calls": 0, "token_samples": 0}
    original = getattr(module, name)

    def counted(*args, **kwargs):
        u = args[1]                                        # (block, tokens, ...)
        seen["calls"] += 1
        seen["token_samples"] += u.shape[0] * u.shape[1]
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return seen


@pytest.mark.parametrize("guidance", ["none", "ab", "a-annealed"])
@pytest.mark.parametrize("tol", [0.0, 1e-3])
def test_fast_path_token_passes_match_the_formula(monkeypatch, guidance, tol):
    cfg, model, _, z, (_, ty) = setup("cond-even-P2")
    g = GUIDANCE[guidance]
    B, T = len(z), cfg.tokens
    strategy = Strategy((2, 0), (T, 1), (0, 1), tol=tol)
    seen = counting(monkeypatch, engine, "conditioner")
    trace = tj.Trace()
    tj.inverse_gsj(model, torch.from_numpy(z), ty, g, strategy=strategy, trace=trace)
    branches = 2 if g else 1
    formula = sum(block_cost(T, trace.plans[b].modules, trace.iterations(b))[0] for b in range(cfg.blocks))
    # the engine runs both guidance branches as one batch of 2B: count token x sample pairs
    assert seen["token_samples"] == B * trace.cost().token_passes == B * branches * formula
    assert seen["calls"] == trace.cost().steps
    if tol == 0:
        assert trace.cost() == strategy.cost(cfg, g)
    else:
        assert trace.cost().token_passes < strategy.cost(cfg, g).token_passes    # it stopped early


def test_fast_path_counts_a_small_case_by_hand(monkeypatch):
    cfg, model, _, z, (_, ty) = setup("cond-odd-P1-gray")
    strategy = Strategy((4,), (2,), (1,))
    seen = counting(monkeypatch, engine, "conditioner")
    trace = tj.Trace()
    tj.inverse_gsj(model, torch.from_numpy(z), ty, GUIDANCE["a-annealed"], strategy=strategy, trace=trace)
    assert seen["calls"] == strategy.cost(cfg).steps == 4 * 2 + 3 and cfg.tokens == 16
    assert trace.iterations(0) == [2] * 4


def test_plain_reference_passes_finished_modules_whole(monkeypatch):
    """Its steps are the formula's; its finishing passes cover the whole module (no saving)."""
    cfg, _, params, z, (y, _) = setup("cond-even-P2")
    T, M = cfg.tokens, cfg.tokens // 2
    strategy = Strategy((2, 0), (3, 1), (0, 1))
    seen = counting(monkeypatch, flow, "conditioner")
    jacobi.inverse_gsj(params, cfg, z, y, strategy=strategy)
    passes, steps = strategy.cost(cfg).token_passes, strategy.cost(cfg).steps
    assert seen["calls"] == steps
    assert seen["token_samples"] == len(z) * (passes + 3)          # module 0's pass: M tokens, not M - K_0
    assert M - 3 + 3 == M and passes == block_cost(T, 2, [3, 3])[0] + block_cost(T, T, [0] * T)[0]


# ---------------------------------------------------------------- torch GS-Jacobi == torch sequential

@pytest.mark.parametrize("guidance", ["none", "ab", "a-annealed"])
@pytest.mark.parametrize("name", NAMES)
def test_torch_gs_jacobi_equals_the_torch_sequential_sampler(name, guidance):
    cfg, model, _, z, (_, ty) = setup(name)
    g = GUIDANCE[guidance]
    T, N = cfg.tokens, cfg.blocks
    noise = torch.from_numpy(z)
    want = sample(model, noise, ty, g)
    strategy = Strategy(([1, 2, 0] * N)[:N], [T] * N, ([0, 1, 0] * N)[:N])
    assert rel_err(tj.sample_gsj(model, noise, ty, strategy, g), want.numpy()) < 1e-9
    assert rel_err(tj.sample_gsj(model, noise, ty, strategy.to_text(), g), want.numpy()) < 1e-9
    sequential = tj.inverse_gsj(model, noise, ty, g, strategy=Strategy.uniform(N, 0, 1))
    assert torch.equal(sequential, sampling.inverse(model, noise, ty, g))   # the very same arithmetic


# ---------------------------------------------------------------- bad input, before any work

@pytest.mark.parametrize("strategy, message", [
    (Strategy.uniform(5, 1, 2), "has 5 entries per list but the model has 2 flow blocks"),
    ("G=[3,1] J=[2,2]", "G[0] = 3 cannot cut the T = 16 tokens"),
    ("G=[1,1] J=[0,2]", "J[0] = 0"),
    ("G=[-1,1] J=[2,2]", "G[0] = -1"),
    ("afhq9", "unknown strategy preset 'afhq9'"),
    ("afhq256", "has 8 entries per list but the model has 2 flow blocks"),
    (None, "no strategy given"),
    (42, "expected a Strategy or strategy text"),
])
def test_bad_strategies_fail_before_any_work(monkeypatch, strategy, message):
    cfg, model, params, z, (y, ty) = setup("cond-even-P2")
    seen = counting(monkeypatch, engine, "conditioner")
    np_seen = counting(monkeypatch, flow, "conditioner")
    with pytest.raises(ValueError) as err:
        tj.sample_gsj(model, torch.from_numpy(z), ty, strategy)
    assert message in str(err.value)
    with pytest.raises(ValueError) as err:
        np_model.sample(params, cfg, z, y, sampler=jacobi.gs_jacobi(strategy))
    assert message in str(err.value)
    assert seen["calls"] == np_seen["calls"] == 0


def test_bad_inputs_fail_clearly():
    cfg, model, params, z, (y, ty) = setup("cond-even-P2")
    strategy = Strategy.uniform(cfg.blocks, 2, 3)
    with pytest.raises(ValueError, match=r"expected noise of shape \[B, 16, 12\]"):
        tj.sample_gsj(model, torch.zeros(2, 15, 12, dtype=torch.float64), None, strategy)
    with pytest.raises(ValueError, match="labels must be < 4"):
        tj.sample_gsj(model, torch.from_numpy(z), torch.tensor([4, 0, 0]), strategy)
    with pytest.raises(ValueError, match="cannot cut the T = 16"):
        jacobi.block_inverse_gsj(block(params, 0), z, y, cfg, BlockPlan(5, 1))
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        auto_strategy(model, ty, tol=0)
    with pytest.raises(ValueError, match="labels must have shape"):
        tj.sample_gsj(model, torch.from_numpy(z), ty[:2], strategy)


# ---------------------------------------------------------------- the automatic strategy

def test_auto_strategy_meets_its_tolerance_with_fewer_steps():
    cfg, model, _, _, (_, ty) = setup("cond-even-P2")
    tol = 1e-3
    strategy = auto_strategy(model, ty, tol=tol, seed=5)
    sequential = Strategy.uniform(cfg.blocks, 0, 1)
    assert strategy.cost(cfg).steps < sequential.cost(cfg).steps
    gen = torch.Generator().manual_seed(5)                 # the search batch, drawn as the search draws it
    search = torch.randn(3, cfg.tokens, cfg.token_dim, generator=gen, dtype=torch.float64)
    assert (tj.sample_gsj(model, search, ty, strategy) - sample(model, search, ty)).abs().max() <= tol / 10
    fresh = torch.randn(8, cfg.tokens, cfg.token_dim, generator=gen, dtype=torch.float64)
    fresh_y = torch.arange(8) % cfg.num_classes
    assert (tj.sample_gsj(model, fresh, fresh_y, strategy) - sample(model, fresh, fresh_y)).abs().max() <= tol


# ---------------------------------------------------------------- bfloat16 autocast (CPU, and CUDA when present)

@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bf16_gs_jacobi_matches_the_bf16_sequential_sampler(device):
    cfg, model, _, z, (_, ty) = setup("cond-odd-P1-gray")
    model = model.float().to(device)
    noise, ty = torch.from_numpy(z).float().to(device), ty.to(device)
    strategy = Strategy.uniform(cfg.blocks, 2, cfg.tokens)              # exact: M - 1 iterations per module
    want = sample(model, noise, ty, bf16=True)
    got = tj.sample_gsj(model, noise, ty, strategy, bf16=True)
    full = sample(model, noise, ty)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (want - full).abs().max() > 1e-4                            # bfloat16 is really in use
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
