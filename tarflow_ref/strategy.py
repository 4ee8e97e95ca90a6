"""GS-Jacobi sampling strategies: per flow block, how its inverse is solved, and what that costs
(Liu & Qin 2025, Sec. 4; book/checkpoints.md, "GS-Jacobi strategies").

A strategy gives, per block, in SAMPLING order (entry 0 = the last forward block N-1, which the
sampler inverts first):

    G   modules: the T tokens are cut into G equal modules of M = T / G tokens, solved one after
        another (Gauss-Seidel), each by Jacobi iterations.  G = 1 is plain Jacobi, G = T is the
        sequential sampler, and 0 (the paper's spelling) also means G = T.
    J   the most Jacobi iterations per module (>= 1); min(J, M - 1) are run (jacobi.py).
    guess   the initial iterate: 0 -> x^0 = z,  1 -> x^0 = [z_0, 0, ..., 0].

and, for the whole run, a tolerance eps >= 0 (the fast path stops a module early once
||x^{k+1} - x^k||_2 / (B * D) < eps, the Euclidean norm over all B * M * D values of the module;
eps = 0 never stops early) and `clamp` (clip every iterate to [-3, 3], as the published code does).

Cost of one block on the fast path (torch_backend/jacobi.py), counted for one guidance branch
(twice that with guidance), when module i runs K_i <= min(J, M - 1) iterations:

    token passes = sum_i K_i (M - 1)  +  sum_{i < G-1} (M - K_i)
    steps        = sum_i K_i          +  G - 1              (sequential transformer calls)

An iteration evaluates the module's first M - 1 tokens; a finished module, except the last one,
then passes its tokens once more from the first one its last iteration changed (position
s + K_i), which writes final keys and values into the cache and predicts the first token of the
next module. Sequential (M = 1): T - 1 token passes in T - 1 steps. The text forms of a strategy
are read and written by strategy_text.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import TarFlowConfig
from .guidance import Guidance, branches
from .registry import RELEASES, Release

GUESSES = {0: "x0 = z", 1: "x0 = [z_0, 0, ..., 0]"}


def check_entry(where: str, modules: int, iterations: int, guess: int):
    """ValueError naming the bad count of one block (G = 0 is allowed: it means sequential)."""
    if modules < 0:
        raise ValueError(f"G{where} = {modules}: the number of modules must be >= 1 (or 0 for sequential)")
    if iterations < 1:
        raise ValueError(f"J{where} = {iterations}: the number of Jacobi iterations must be >= 1")
    if guess not in GUESSES:
        raise ValueError(f"guess{where} = {guess}: the initial guess must be 0 ({GUESSES[0]}) or 1 ({GUESSES[1]})")


def divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_modules(where: str, modules: int, tokens: int):
    if modules > tokens or (modules and tokens % modules):
        raise ValueError(f"G{where} = {modules} cannot cut the T = {tokens} tokens into equal modules; "
                         f"use one of {divisors(tokens)} (or 0 for sequential)")


@dataclass(frozen=True)
class BlockPlan:
    """How one block is inverted: G modules (1..T; 0 is resolved by Strategy.block_plan), J, guess,
    eps, clamp."""
    modules: int
    iterations: int
    guess: int = 0
    tol: float = 0.0
    clamp: bool = False

    def __post_init__(self):
        check_entry("", self.modules, self.iterations, self.guess)
        if self.modules == 0:
            raise ValueError("a BlockPlan needs G >= 1; G = T is the sequential sampler")
        if not self.tol >= 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tol}")

    def check(self, tokens: int):
        check_modules("", self.modules, tokens)

    def module_iterations(self, tokens: int) -> int:
        """Iterations per module when nothing stops early: min(J, M - 1), M = T / G
        (M - 1 already make a module exact)."""
        return min(self.iterations, tokens // self.modules - 1)


@dataclass(frozen=True)
class Cost:
    token_passes: int      # tokens through the transformer, all guidance branches
    steps: int             # sequential transformer calls (a guided call evaluates both branches)


@dataclass(frozen=True)
class Strategy:
    """Per-block lists in SAMPLING order (entry 0 = forward block N-1); see the module docstring."""
    modules: tuple
    iterations: tuple
    guesses: tuple
    tol: float = 0.0
    clamp: bool = False

    def __post_init__(self):
        for name in ("modules", "iterations", "guesses"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        lengths = {len(self.modules), len(self.iterations), len(self.guesses)}
        if len(lengths) != 1:
            raise ValueError(f"strategy lists differ in length: G has {len(self.modules)} entries, "
                             f"J {len(self.iterations)}, guess {len(self.guesses)}")
        if not self.modules:
            raise ValueError("a strategy needs one entry per flow block, got none")
        for i, entry in enumerate(zip(self.modules, self.iterations, self.guesses)):
            check_entry(f"[{i}]", *entry)
        if not self.tol >= 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tol}")

    @classmethod
    def uniform(cls, blocks: int, modules: int, iterations: int, guess: int = 0, tol=0.0, clamp=False):
        """The same G, J and guess for every block (G = 0: sequential, G = 1: plain Jacobi)."""
        return cls((modules,) * blocks, (iterations,) * blocks, (guess,) * blocks, tol, clamp)

    def check(self, cfg: TarFlowConfig):
        """Raise ValueError unless the strategy fits a model with this configuration."""
        if len(self.modules) != cfg.blocks:
            raise ValueError(f"the strategy has {len(self.modules)} entries per list but the model has "
                             f"{cfg.blocks} flow blocks (one entry per block, sampling order)")
        for i, g in enumerate(self.modules):
            check_modules(f"[{i}]", g, cfg.tokens)

    def block_plan(self, b: int, cfg: TarFlowConfig) -> BlockPlan:
        """The plan of FORWARD block b (entry N-1-b of the sampling-order lists), G resolved."""
        i = cfg.blocks - 1 - b
        return BlockPlan(self.modules[i] or cfg.tokens, self.iterations[i], self.guesses[i], self.tol, self.clamp)

    def cost(self, cfg: TarFlowConfig, guidance: Guidance | None = None) -> Cost:
        """Token passes and steps of the whole model with no early stop (the formula above)."""
        self.check(cfg)
        tokens = steps = 0
        for b in range(cfg.blocks):
            plan = self.block_plan(b, cfg)
            t, s = block_cost(cfg.tokens, plan.modules, [plan.module_iterations(cfg.tokens)] * plan.modules)
            tokens, steps = tokens + t, steps + s
        return Cost(branches(guidance) * tokens, steps)

    def to_text(self, compact: bool = False) -> str:
        """The list form, or the compact [Stack-GS-J-Else] form (strategy_text.py)."""
        from .strategy_text import to_text

        return to_text(self, compact)

    def __str__(self):
        return self.to_text()


def block_cost(tokens: int, modules: int, iterations) -> tuple[int, int]:
    """(token passes, steps) of one block for one branch; iterations: K_i per module."""
    M = tokens // modules
    passes = sum(k * (M - 1) for k in iterations) + sum(M - k for k in iterations[:-1])
    return passes, sum(iterations) + modules - 1


@dataclass(frozen=True)
class Preset:
    """A published setting (the GS-Jacobi release; book/checkpoints.md, "GS-Jacobi strategies"): strategy,
    guidance and denoise factor, under the release's name and file (registry.py)."""
    name: str
    file: str
    strategy: Strategy
    guidance: Guidance       # cfg weight, and tau_u as the unconditional branch's temperature
    denoise_factor: float

    @classmethod
    def of(cls, release: Release) -> Preset | None:
        """The published setting of a release (None for one without): guidance on both a and m,
        not annealed, as the released sampler's defaults."""
        p = release.published
        if p is None:
            return None
        return cls(release.name, release.file, Strategy(p.modules, p.iterations, p.guesses),
                   Guidance(p.guidance, "ab", False, p.tau_u), p.denoise_factor)


# keyed by the release's name and by its released file name
PRESETS = {key: p for p in map(Preset.of, RELEASES.values()) if p is not None for key in (p.name, p.file)}
