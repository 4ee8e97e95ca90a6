"""The textbook loop started late (textbook.block_inverse(first=k)) continues a full run exactly, and
the benchmark's two-window extrapolation of its cost (benchmarks/sampling.py `two_window_total`)
is exact for a per-step cost linear in the position."""
import importlib.util
from pathlib import Path

import pytest
import torch

from tarflow_ref import Guidance
from tarflow_ref.torch_backend import textbook

from conftest import SMALL_CONFIGS, make_model

GUIDANCE = {"none": None, "ab-tau": Guidance(1.5, "ab", temperature=0.6),
            "a-annealed-tau": Guidance(0.8, "a", annealed=True, temperature=1.3)}


def setup(name, batch=3):
    cfg = SMALL_CONFIGS[name]
    model, _ = make_model(cfg, seed=2, out_scale=0.2)
    z = torch.randn(batch, cfg.tokens, cfg.token_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([1, -1, 2][:batch]) if cfg.conditional else None
    return cfg, model, z, y


def decoded_prefix(block, z, x, first):
    """z with tokens 0..first of the block's order replaced by the decoded x (image order in, out)."""
    u, decoded = block.permute(z), block.permute(x)
    return block.permute(torch.cat([decoded[:, :first + 1], u[:, first + 1:]], dim=1))


def relative_error(got, want):
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("guide", list(GUIDANCE))
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_late_start_continues_the_full_run(name, guide):
    cfg, model, z, y = setup(name)
    g, T = GUIDANCE[guide], cfg.tokens
    for block in {model.blocks[0], model.blocks[-1]}:          # both token orders where there are two blocks
        whole = textbook.block_inverse(block, z, y, g)
        assert relative_error(whole, z) > 0.01                  # the block does change the tokens
        for first in sorted({1, T // 2, T - 2}):
            started = decoded_prefix(block, z, whole, first)
            late = textbook.block_inverse(block, started, y, g, first=first)
            assert relative_error(late, whole) < 1e-12
            # the decoded prefix passes through untouched: the loop starts at step `first`
            assert torch.equal(block.permute(late)[:, :first + 1], block.permute(whole)[:, :first + 1])


def test_late_window_decodes_only_its_steps():
    cfg, model, z, y = setup("cond-even-P2")
    block, g, first, steps = model.blocks[1], GUIDANCE["ab-tau"], 6, 4
    whole = textbook.block_inverse(block, z, y, g)
    started = decoded_prefix(block, z, whole, first)
    window = block.permute(textbook.block_inverse(block, started, y, g, steps=steps, first=first))
    end = first + steps + 1
    assert relative_error(window[:, :end], block.permute(whole)[:, :end]) < 1e-12
    assert torch.equal(window[:, end:], block.permute(z)[:, end:])


def test_first_out_of_range_is_named():
    cfg, model, z, y = setup("uncond-odd-P4")
    for first in [-1, cfg.tokens]:
        with pytest.raises(ValueError, match=f"first must be a position 0..{cfg.tokens - 1}"):
            textbook.block_inverse(model.blocks[0], z, y, first=first)


def benchmark():
    path = Path(__file__).parents[1] / "benchmarks" / "sampling.py"
    spec = importlib.util.spec_from_file_location("benchmark_sampling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tokens, steps", [(1024, 128), (256, 16), (64, 8), (16, 14), (3, 1)])
def test_two_window_extrapolation_is_exact_for_a_linear_cost(tokens, steps):
    two_window_total = benchmark().two_window_total
    blocks, c0, c1 = 8, 2.5e-3, 4e-6

    def cost(t):
        return c0 + c1 * t
    early = sum(cost(t) for t in range(steps))
    late = sum(cost(t) for t in range(tokens - 1 - steps, tokens - 1))
    want = blocks * sum(cost(t) for t in range(tokens - 1))
    assert two_window_total(early, late, steps, tokens, blocks) == pytest.approx(want, rel=1e-12)
    # the old extrapolation, the first window scaled up, misses the growth of the cost
    assert early * blocks * (tokens - 1) / steps < want
    with pytest.raises(ValueError, match="two windows"):
        two_window_total(early, late, tokens - 1, tokens, blocks)


def test_benchmark_rows_carry_the_windows_and_the_memory_floor(tmp_path):
    """One small run: (a) from two windows, (e) = the traffic of the run's setting / its bandwidth."""
    import json

    from tarflow_ref.traffic import sequential_traffic
    bench = benchmark()
    out = tmp_path / "rows.json"
    bench.main(["--configs", "quick", "--batch", "2", "--max-steps", "3", "--repeat", "1", "--device", "cpu",
                "--dtype", "float64", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    traffic = sequential_traffic(bench.QUICK, 2, guided=True, bytes_per_value=8)
    assert row["traffic"] == traffic and row["bandwidth"] > 0
    assert row["memory_floor_s"] == pytest.approx(traffic["total"] / row["bandwidth"], rel=1e-12)
    early, late = row["textbook_windows_s"]
    want = bench.two_window_total(early, late, 3, bench.QUICK.tokens, bench.QUICK.blocks)
    assert row["textbook_s"] == pytest.approx(want, rel=1e-12)
