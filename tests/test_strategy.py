"""Strategies: the three text forms, presets against the published table, validation before any work,
and the cost formula on hand-counted cases."""
import pytest

from tarflow_ref import Guidance, TarFlowConfig
from tarflow_ref.strategy import PRESETS, BlockPlan, Strategy, block_cost
from tarflow_ref.strategy_text import parse_strategy

AFHQ = TarFlowConfig.from_release_name("afhq_model_8_768_8_8_0.07.pth")              # T = 1024, N = 8
P4 = TarFlowConfig.from_release_name("imagenet_model_4_1024_8_8_0.05.pth")           # T = 256
SMALL = TarFlowConfig(image_size=4, patch_size=1, channels=1, width=16, blocks=3, layers=1, head_dim=8)  # T = 16


def test_list_form_reads_sampling_order():
    s = parse_strategy("G=[8,1,1,1,1,1,1,1] J=[32,10,10,10,10,10,10,10] guess=[0,0,0,0,0,1,1,0]", AFHQ)
    assert s.modules == (8, 1, 1, 1, 1, 1, 1, 1)
    # entry 0 is the LAST forward block: the one the sampler inverts first
    assert s.block_plan(7, AFHQ) == BlockPlan(8, 32, 0)
    assert s.block_plan(0, AFHQ) == BlockPlan(1, 10, 0)
    assert s.block_plan(2, AFHQ).guess == 1 and s.block_plan(1, AFHQ).guess == 1


def test_list_form_variants_and_options():
    s = parse_strategy("G=8,1,1 ; J = [4, 2, 2] tol=1e-4 clamp", SMALL)
    assert (s.modules, s.iterations, s.guesses, s.tol, s.clamp) == ((8, 1, 1), (4, 2, 2), (0, 0, 0), 1e-4, True)


def test_zero_modules_means_sequential():
    s = parse_strategy("G=[0,1,16] J=[1,3,1]", SMALL)
    assert s.block_plan(2, SMALL).modules == SMALL.tokens
    assert s.block_plan(0, SMALL).modules == SMALL.tokens


def test_compact_form():
    s = parse_strategy("[7-8-32-10]", AFHQ)
    assert s.modules == (8, 1, 1, 1, 1, 1, 1, 1) and s.iterations == (32,) + (10,) * 7
    s = parse_strategy("[0-4-5-3] guess=[1,0,1] tol=0.001", SMALL)
    assert s.modules == (1, 1, 4) and s.iterations == (3, 3, 5) and s.guesses == (1, 0, 1) and s.tol == 0.001


@pytest.mark.parametrize("strategy", [
    Strategy((8, 1, 1), (4, 2, 2), (0, 1, 0)),
    Strategy((1, 1, 1), (3, 3, 3), (0, 0, 0), tol=1e-5, clamp=True),
    Strategy((1, 0, 1), (6, 1, 6), (0, 0, 0)),
    Strategy((2, 4, 1), (3, 2, 2), (0, 0, 0)),          # no compact form
])
def test_text_round_trip(strategy):
    assert parse_strategy(strategy.to_text(), SMALL) == strategy
    try:
        compact = strategy.to_text(compact=True)
    except ValueError as err:
        assert "no compact form" in str(err) and strategy.modules == (2, 4, 1)
        return
    assert compact.startswith("[") and parse_strategy(compact, SMALL) == strategy


def test_presets_match_the_published_table():
    table = {  # book/checkpoints.md, "GS-Jacobi strategies": model -> (cfg, denoise, tau_u, G, J, guess)
        "afhq256": (3.4, 1.4, 1.0, [8, 1, 1, 1, 1, 1, 1, 1], [32, 10, 10, 10, 10, 10, 10, 10],
                    [0, 0, 0, 0, 0, 1, 1, 0]),
        "imagenet128": (1.5, 0.97, 1.0, [1, 8, 1, 1, 1, 1, 1, 1], [10, 32, 10, 10, 10, 10, 10, 10],
                        [0, 1, 0, 0, 0, 0, 1, 0]),
        "imagenet64-uncond": (0.2, 0.9, 0.3, [1, 8, 1, 1, 1, 1, 1, 8], [20, 32, 20, 20, 20, 20, 20, 32],
                              [0, 1, 0, 0, 1, 0, 1, 1]),
        "imagenet64-cond-p4": (2.0, 1.0, 1.0, [8, 1, 1, 1, 1, 1, 1, 0], [13, 6, 6, 6, 6, 6, 6, 1],
                               [1, 0, 0, 0, 0, 1, 1, 1]),
    }
    for name, (weight, denoise, tau, G, J, guess) in table.items():
        p = PRESETS[name]
        assert PRESETS[p.file] is p
        assert (p.guidance.weight, p.denoise_factor, p.guidance.temperature) == (weight, denoise, tau)
        assert (list(p.strategy.modules), list(p.strategy.iterations), list(p.strategy.guesses)) == (G, J, guess)
        cfg = TarFlowConfig.from_release_name(p.file)
        assert parse_strategy(name, cfg) == parse_strategy(p.file, cfg) == p.strategy
    assert parse_strategy("afhq256", AFHQ).to_text(compact=True) == "[7-8-32-10] guess=[0,0,0,0,0,1,1,0]"


def test_presets_are_faster_than_sequential():
    for p in {p.name: p for p in PRESETS.values()}.values():
        cfg = TarFlowConfig.from_release_name(p.file)
        sequential = Strategy.uniform(cfg.blocks, 0, 1).cost(cfg)
        assert p.strategy.cost(cfg).steps < sequential.steps / 2.5


@pytest.mark.parametrize("text, cfg, message", [
    ("G=[8,1,1] J=[1,1,1]", AFHQ, "has 3 entries per list but the model has 8 flow blocks"),
    ("G=[1,1] J=[1,1,1]", SMALL, "lists differ in length"),
    ("G=[3,1,1] J=[2,2,2]", SMALL,
     "G[0] = 3 cannot cut the T = 16 tokens into equal modules; use one of [1, 2, 4, 8, 16]"),
    ("G=[32,1,1] J=[2,2,2]", SMALL, "G[0] = 32 cannot cut the T = 16 tokens"),
    ("G=[1,-2,1] J=[2,2,2]", SMALL, "G[1] = -2: the number of modules must be >= 1 (or 0 for sequential)"),
    ("G=[1,1,1] J=[2,0,2]", SMALL, "J[1] = 0: the number of Jacobi iterations must be >= 1"),
    ("G=[1,1,1] J=[2,-1,2]", SMALL, "J[1] = -1"),
    ("G=[1,1,1] J=[2,2,2] guess=[0,2,0]", SMALL, "guess[1] = 2: the initial guess must be 0"),
    ("G=[1,1,1]", SMALL, "lacks J=[...]"),
    ("G=[1,1,1] J=[1,1,1] tol=-1", SMALL, "tolerance must be >= 0"),
    ("G=[1,1,1] J=[1,1,1] fast", SMALL, "cannot read strategy text at 'fast'"),
    ("[3-4-5-2]", SMALL, "Stack = 3 is not a forward block index 0..2"),
    ("[2-4-5]", SMALL, "must be [Stack-GS-J-Else] with four integers"),
    ("[2-0-0-2]", SMALL, "J[0] = 0"),
    ("[2-5-2-2]", SMALL, "G[0] = 5 cannot cut"),
    ("afhq", AFHQ, "unknown strategy preset 'afhq'; presets: afhq256, imagenet128"),
    ("afhq256", SMALL, "has 8 entries per list but the model has 3 flow blocks"),
    ("  ", SMALL, "empty strategy"),
])
def test_bad_strategies_fail_clearly(text, cfg, message):
    with pytest.raises(ValueError) as err:
        parse_strategy(text, cfg)
    assert message in str(err.value)


def test_block_plan_checks():
    with pytest.raises(ValueError, match="needs G >= 1"):
        BlockPlan(0, 3)
    with pytest.raises(ValueError, match="J = 0"):
        BlockPlan(2, 0)
    with pytest.raises(ValueError, match="G = 3 cannot cut the T = 16"):
        BlockPlan(3, 2).check(16)


def test_cost_formula_by_hand():
    T = 16
    assert block_cost(T, T, [0] * T) == (15, 15)                    # sequential: T - 1 single tokens
    assert block_cost(T, 1, [15]) == (15 * 15, 15)                  # plain Jacobi, exact: T - 1 passes of T - 1
    assert block_cost(T, 1, [4]) == (4 * 15, 4)
    # G = 4, M = 4, K = 2 each: iterations 4 * 2 * 3 tokens, finishing passes 3 * (4 - 2) tokens, 8 + 3 calls
    assert block_cost(T, 4, [2, 2, 2, 2]) == (24 + 6, 11)
    s = Strategy((4, 1, 0), (2, 4, 1), (0, 0, 0))
    guided = s.cost(SMALL, Guidance(1.0))
    assert s.cost(SMALL) == type(guided)(30 + 60 + 15, 11 + 4 + 15)
    assert guided.token_passes == 2 * s.cost(SMALL).token_passes and guided.steps == s.cost(SMALL).steps
