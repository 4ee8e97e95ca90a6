"""GS-Jacobi sampling strategies: per flow block, how its inverse is solved (Liu & Qin 2025, Sec. 4;
SPEC, "Jacobi and GS-Jacobi inversion").

A strategy gives, per block, in SAMPLING order (entry 0 = the last forward block N-1, which the
sampler inverts first):

    G   modules: the T tokens are cut into G equal modules of M = T / G tokens, solved one after
        another (Gauss-Seidel), each by Jacobi iterations.  G = 1 is plain Jacobi, G = T is the
        sequential sampler, and 0 (the paper's spelling) also means G = T.
    J   the most Jacobi iterations per module (>= 1). A module of M tokens whose first token is
        already exact is solved exactly after M - 1 iterations, so min(J, M - 1) are run.
    guess   the initial iterate: 0 -> x^0 = z,  1 -> x^0 = [z_0, 0, ..., 0].

and, for the whole run, a tolerance eps >= 0 (a module stops early once
||x^{k+1} - x^k||_2 / (B * D) < eps, the Euclidean norm over all B * M * D values of the module;
eps = 0 never stops early) and `clamp` (clip every iterate to [-3, 3], as the published code does).

Cost of one block, counted for one guidance branch (twice that with guidance), when module i runs
K_i <= min(J, M - 1) iterations (K_i = min(J, M - 1) when nothing stops early):

    token passes = sum_i K_i (M - 1)  +  sum_{i < G-1} (M - K_i)
    steps        = sum_i K_i          +  G - 1              (sequential transformer calls)

An iteration evaluates the module's first M - 1 tokens (they predict tokens 2..M); a finished
module, except the last one, then passes its tokens once more from the first one its last
iteration changed (position s + K_i), which writes final keys and values into the cache and
predicts the first token of the next module. Sequential (M = 1): T - 1 token passes in T - 1 steps.

Text forms (`parse_strategy` reads all three, `Strategy.to_text` writes the first two):

    list form        G=[8,1,1,1,1,1,1,1] J=[32,10,10,10,10,10,10,10] guess=[0,0,0,0,0,1,1,0]
    compact          [7-8-32-10]   = [Stack-GS-J-Else]: forward block Stack gets GS modules with
                     J iterations, every other block plain Jacobi with Else iterations
    preset           a released file name or a short name from PRESETS (the published settings)

Both written forms may end with `guess=[...]` (compact), `tol=<eps>` and `clamp`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .config import TarFlowConfig
from .guidance import Guidance, branches

GUESSES = {0: "x0 = z", 1: "x0 = [z_0, 0, ..., 0]"}


def check_entry(where: str, modules: int, iterations: int, guess: int):
    """ValueError naming the bad count of one block (G = 0 is allowed: it means sequential)."""
    if modules < 0:
        raise ValueError(f"G{where} = {modules}: the number of modules must be >= 1 (or 0 for sequential)")
    if iterations < 1:
        raise ValueError(f"J{where} = {iterations}: the number of Jacobi iterations must be >= 1")
    if guess not in GUESSES:
        raise ValueError(f"guess{where} = {guess}: the initial guess must be 0 ({GUESSES[0]}) or 1 ({GUESSES[1]})")


def check_modules(where: str, modules: int, tokens: int):
    if modules > tokens or (modules and tokens % modules):
        divisors = [d for d in range(1, tokens + 1) if tokens % d == 0]
        raise ValueError(f"G{where} = {modules} cannot cut the T = {tokens} tokens into equal modules; "
                         f"use one of {divisors} (or 0 for sequential)")


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
        """The list form, or the compact [Stack-GS-J-Else] form (ValueError when it does not fit)."""
        extras = ([f"tol={self.tol!r}"] if self.tol else []) + (["clamp"] if self.clamp else [])
        if not compact:
            return " ".join([f"G={_list(self.modules)}", f"J={_list(self.iterations)}",
                             f"guess={_list(self.guesses)}"] + extras)
        N = len(self.modules)
        guesses = [f"guess={_list(self.guesses)}"] if any(self.guesses) else []
        for i in sorted(range(N), key=lambda i: self.modules[i] == 1):      # blocks with modules first
            rest = [k for k in range(N) if k != i]
            if all(self.modules[k] == 1 for k in rest) and len({self.iterations[k] for k in rest}) <= 1:
                else_j = self.iterations[rest[0]] if rest else self.iterations[i]
                head = f"[{N - 1 - i}-{self.modules[i]}-{self.iterations[i]}-{else_j}]"
                return " ".join([head] + guesses + extras)
        raise ValueError(f"{self.to_text()} has no compact form: it needs every block but one to be "
                         f"plain Jacobi (G = 1) with the same J")

    def __str__(self):
        return self.to_text()


def block_cost(tokens: int, modules: int, iterations) -> tuple[int, int]:
    """(token passes, steps) of one block for one branch; iterations: K_i per module."""
    M = tokens // modules
    passes = sum(k * (M - 1) for k in iterations) + sum(M - k for k in iterations[:-1])
    return passes, sum(iterations) + modules - 1


def _list(values) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


@dataclass(frozen=True)
class Preset:
    """A published setting (GS-Jacobi README, SPEC table): strategy, guidance and denoise factor."""
    name: str
    file: str
    strategy: Strategy
    guidance: Guidance       # cfg weight, and tau_u as the unconditional branch's temperature
    denoise_factor: float


def _preset(name, file, cfg_weight, denoise, tau_u, G, J, guess):
    # guide what and annealing: the released sampler's defaults ('ab', not annealed)
    return Preset(name, file, Strategy(G, J, guess), Guidance(cfg_weight, "ab", False, tau_u), denoise)


_PUBLISHED = [
    _preset("afhq256", "afhq_model_8_768_8_8_0.07.pth", 3.4, 1.4, 1.0,
            [8, 1, 1, 1, 1, 1, 1, 1], [32, 10, 10, 10, 10, 10, 10, 10], [0, 0, 0, 0, 0, 1, 1, 0]),
    _preset("imagenet128", "imagenet_model_4_1024_8_8_0.15.pth", 1.5, 0.97, 1.0,
            [1, 8, 1, 1, 1, 1, 1, 1], [10, 32, 10, 10, 10, 10, 10, 10], [0, 1, 0, 0, 0, 0, 1, 0]),
    _preset("imagenet64-uncond", "imagenet64_model_2_768_8_8_0.05.pth", 0.2, 0.9, 0.3,
            [1, 8, 1, 1, 1, 1, 1, 8], [20, 32, 20, 20, 20, 20, 20, 32], [0, 1, 0, 0, 1, 0, 1, 1]),
    _preset("imagenet64-cond-p4", "imagenet_model_4_1024_8_8_0.05.pth", 2.0, 1.0, 1.0,
            [8, 1, 1, 1, 1, 1, 1, 0], [13, 6, 6, 6, 6, 6, 6, 1], [1, 0, 0, 0, 0, 1, 1, 1]),
]

# keyed by short name and by released file name
PRESETS = {key: p for p in _PUBLISHED for key in (p.name, p.file)}

_NUMBERS = r"\[?\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]?"
_COMPACT = re.compile(r"^\[\s*(-?\d+)\s*-\s*(-?\d+)\s*-\s*(-?\d+)\s*-\s*(-?\d+)\s*\]$")


def parse_strategy(text: str, cfg: TarFlowConfig) -> Strategy:
    """A preset name, the list form or the compact form -> Strategy, checked against cfg.

    Every problem (syntax, lengths, counts, a G that cannot split T, an unknown preset) raises
    ValueError naming it, before any sampling work.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty strategy: give a preset name, G=[..] J=[..] guess=[..], or [Stack-GS-J-Else]")
    if text in PRESETS:
        strategy = PRESETS[text].strategy
    elif text.startswith("[") or "=" in text:
        strategy = _parse_forms(text, cfg.blocks)
    else:
        names = sorted(p.name for p in _PUBLISHED)
        raise ValueError(f"unknown strategy preset '{text}'; presets: {', '.join(names)} (or their released "
                         f"file names), or a list form 'G=[..] J=[..] guess=[..]', or compact '[Stack-GS-J-Else]'")
    strategy.check(cfg)
    return strategy


def _parse_forms(text: str, blocks: int) -> Strategy:
    head, fields, tol, clamp = _split_options(text)
    if head is not None:
        stack, gs, j, else_j = (int(v) for v in head)
        if not 0 <= stack < blocks:
            raise ValueError(f"compact strategy [{stack}-{gs}-{j}-{else_j}]: Stack = {stack} is not a "
                             f"forward block index 0..{blocks - 1}")
        modules, iterations = [1] * blocks, [else_j] * blocks
        modules[blocks - 1 - stack], iterations[blocks - 1 - stack] = gs, j
    else:
        missing = [k for k in ("G", "J") if k not in fields]
        if missing:
            raise ValueError(f"list-form strategy '{text}' lacks {' and '.join(missing)}=[...]")
        modules, iterations = fields["G"], fields["J"]
    guesses = fields.get("guess", [0] * len(modules))
    return Strategy(modules, iterations, guesses, tol, clamp)


def _split_options(text):
    """-> (compact head numbers or None, {'G'|'J'|'guess': list}, tol, clamp)."""
    head = None
    m = re.match(r"^(\[[^\]]*\])\s*(.*)$", text)
    if m and "=" not in m[1]:
        c = _COMPACT.match(m[1])
        if not c:
            raise ValueError(f"compact strategy '{m[1]}' must be [Stack-GS-J-Else] with four integers")
        head, text = c.groups(), m[2]
    fields, tol, clamp = {}, 0.0, False
    pattern = re.compile(r"\s*(?:(G|J|guess)\s*=\s*" + _NUMBERS + r"|tol\s*=\s*([^\s;]+)|(clamp))\s*;?")
    pos = 0
    while pos < len(text):
        m = pattern.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read strategy text at '{text[pos:].strip()}'; expected G=[..], J=[..], "
                             f"guess=[..], tol=<number> or clamp")
        if m[1]:
            if m[1] in fields:
                raise ValueError(f"strategy gives {m[1]}= twice")
            fields[m[1]] = [int(v) for v in m[2].split(",")]
        elif m[3]:
            try:
                tol = float(m[3])
            except ValueError:
                raise ValueError(f"tol={m[3]} is not a number") from None
        else:
            clamp = True
        pos = m.end()
    if head is not None and set(fields) - {"guess"}:
        raise ValueError("a compact strategy [Stack-GS-J-Else] takes only guess=, tol= and clamp after it")
    return head, fields, tol, clamp


def as_strategy(strategy, cfg: TarFlowConfig) -> Strategy:
    """A Strategy or any text `parse_strategy` reads -> a Strategy checked against cfg."""
    if strategy is None:
        raise ValueError("no strategy given: pass a Strategy, a preset name, 'G=[..] J=[..] guess=[..]' "
                         "or a compact '[Stack-GS-J-Else]'")
    if isinstance(strategy, str):
        return parse_strategy(strategy, cfg)
    if not isinstance(strategy, Strategy):
        raise ValueError(f"expected a Strategy or strategy text (preset, list or compact form), got "
                         f"{type(strategy).__name__}")
    strategy.check(cfg)
    return strategy
