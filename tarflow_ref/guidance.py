"""Classifier-free guidance for the affine parameters of a flow block (book/checkpoints.md, "Inverse,
guidance and sampling"; Zhai et al. 2024, Sec. 2.6).

At every decoding step the block is evaluated twice: the conditional branch (label y) gives the
log-scale a and shift m, the unconditional branch (mean class embedding, attention temperature
tau_u) gives a_u and m_u. Guidance pushes the step away from the unconditional prediction:

    a <- a + g (a - a_u)        (guide 'a', the log-scale)
    m <- m + g (m - m_u)        (guide 'b', the shift)

With annealing the weight grows along the sequence, g_t = g (t + 1) / (T - 1) at step t, so early
tokens (little context) are guided gently. For an unconditional model the two branches differ
only by tau_u. The arithmetic here is plain operators, so NumPy arrays and torch tensors share it.
"""
from dataclasses import dataclass

from .validation import check_real, type_name


@dataclass(frozen=True)
class Guidance:
    weight: float = 0.0          # g; 0 turns guidance off
    what: str = "ab"             # any of 'a' (log-scale) and 'b' (shift)
    annealed: bool = False
    temperature: float = 1.0     # tau_u, the attention temperature of the unconditional branch

    def __post_init__(self):
        # a nan weight would fail `weight > 0` and turn guidance off without a word; an empty `what` too
        check_real("guidance weight", self.weight, at_least=0)
        if not (isinstance(self.what, str) and self.what and set(self.what) <= {"a", "b"}):
            raise ValueError(f"guide what must be 'a' (log-scale), 'b' (shift) or 'ab', got {self.what!r}")
        if self.annealed not in (True, False):
            raise ValueError(f"annealed must be True or False, got {self.annealed!r}")
        check_real("attention temperature", self.temperature, above=0)

    @property
    def active(self) -> bool:
        return self.weight > 0 and bool(self.what)

    def weight_at(self, t, tokens: int):
        """g at decoding position t (an int, or an array of positions), T = tokens."""
        return self.weight * (t + 1) / (tokens - 1) if self.annealed else self.weight


def check_guidance(guidance):
    """ValueError unless guidance is a Guidance or None (a bare weight would fail deep inside a sampler)."""
    if guidance is not None and not isinstance(guidance, Guidance):
        raise ValueError(f"guidance must be a Guidance (or None), got {type_name(type(guidance))} {guidance!r}: "
                         f"pass Guidance(weight=...)")


def branches(guidance: Guidance | None) -> int:
    """Evaluations of the block per step: 2 (conditional and unconditional) when guidance is on."""
    return 2 if guidance is not None and guidance.active else 1


def guide(a, m, a_u, m_u, guidance: Guidance, g):
    """Apply guidance with weight g (a scalar, or anything that broadcasts against a)."""
    if "a" in guidance.what:
        a = a + g * (a - a_u)
    if "b" in guidance.what:
        m = m + g * (m - m_u)
    return a, m


def guided(conditioner, y, caches, guidance: Guidance | None, positions, tokens: int):
    """Both branches and their combination, for any backend.

    conditioner(y, cache, temperature) -> (a, m) evaluates the block at the current positions;
    caches = (conditional, unconditional); positions broadcasts against a as [n, 1].
    """
    a, m = conditioner(y, caches[0], 1.0)
    if guidance is None or not guidance.active:
        return a, m
    a_u, m_u = conditioner(None, caches[1], guidance.temperature)
    return guide(a, m, a_u, m_u, guidance, guidance.weight_at(positions, tokens))
