"""The text forms of a GS-Jacobi strategy (strategy.py): read by `parse_strategy`, written by `to_text`.

    list form        G=[8,1,1,1,1,1,1,1] J=[32,10,10,10,10,10,10,10] guess=[0,0,0,0,0,1,1,0]
    compact          [7-8-32-10]   = [Stack-GS-J-Else]: forward block Stack gets GS modules with
                     J iterations, every other block plain Jacobi with Else iterations
    preset           a release's name or its file name (registry.py), from PRESETS (the published settings)

Both written forms may end with `guess=[...]` (compact), `tol=<eps>` and `clamp`. Lists are in
sampling order (entry 0 = forward block N-1). Every problem raises ValueError naming it, before
any sampling work.
"""
from __future__ import annotations

import re

from .config import TarFlowConfig
from .strategy import PRESETS, Strategy


def _list(values) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def to_text(strategy: Strategy, compact: bool = False) -> str:
    """The list form, or the compact [Stack-GS-J-Else] form (ValueError when it does not fit)."""
    extras = ([f"tol={strategy.tol!r}"] if strategy.tol else []) + (["clamp"] if strategy.clamp else [])
    if not compact:
        return " ".join([f"G={_list(strategy.modules)}", f"J={_list(strategy.iterations)}",
                         f"guess={_list(strategy.guesses)}"] + extras)
    N = len(strategy.modules)
    guesses = [f"guess={_list(strategy.guesses)}"] if any(strategy.guesses) else []
    for i in sorted(range(N), key=lambda i: strategy.modules[i] == 1):      # blocks with modules first
        rest = [k for k in range(N) if k != i]
        if all(strategy.modules[k] == 1 for k in rest) and len({strategy.iterations[k] for k in rest}) <= 1:
            else_j = strategy.iterations[rest[0]] if rest else strategy.iterations[i]
            head = f"[{N - 1 - i}-{strategy.modules[i]}-{strategy.iterations[i]}-{else_j}]"
            return " ".join([head] + guesses + extras)
    raise ValueError(f"{strategy.to_text()} has no compact form: it needs every block but one to be "
                     f"plain Jacobi (G = 1) with the same J")


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
        names = sorted({p.name for p in PRESETS.values()})
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
