"""The sampling engine (tarflow_ref/torch_backend/engine.py) computes exactly the sequential inverse:
against the textbook loop (torch_backend/textbook.py: growing caches, two branch passes), the
NumPy reference and the NumPy GS-Jacobi, in float64, float32 and bfloat16 autocast, with and
without guidance; plus the properties that make it fast (static caches, the CUDA-graph body).
"""
import numpy as np
import pytest
import torch

from tarflow_ref import Guidance, jacobi as np_jacobi, model as np_model
from tarflow_ref.flow import block, guided_conditioner as np_guided_conditioner, new_caches as np_new_caches
from tarflow_ref.strategy_text import parse_strategy
from tarflow_ref.torch_backend import sampling, textbook
from tarflow_ref.torch_backend.engine import Engine, KVCache, guided_conditioner, new_caches, span_ends, span_index
from tarflow_ref.torch_backend.jacobi import sample_gsj

from conftest import SMALL_CONFIGS, make_model

GUIDANCE = {
    "none": None,
    "ab": Guidance(1.5, "ab"),
    "a-annealed-tau": Guidance(0.8, "a", annealed=True, temperature=0.6),
    "b-tau": Guidance(2.0, "b", temperature=1.4),
}
# proj_out scale of the whole-model tests: samples of random models stay finite through every block
OUT_SCALE = 0.2


def setup(name, dtype=torch.float64, batch=3, seed=0):
    """(cfg, torch model, NumPy params, noise [B, T, D] in dtype, labels or None)."""
    cfg = SMALL_CONFIGS[name]
    model, params = make_model(cfg, seed=seed + 1, dtype=dtype, out_scale=OUT_SCALE)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, cfg.tokens, cfg.token_dim, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.tensor([1, -1, 2, 0][:batch]) if cfg.conditional else None
    return cfg, model, params, noise, y


def relative_error(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize("guide", list(GUIDANCE))
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_engine_equals_textbook_and_numpy_in_float64(name, guide):
    cfg, model, params, noise, y = setup(name)
    g = GUIDANCE[guide]
    fast = sampling.sample(model, noise, y, g)
    slow = sampling.sample(model, noise, y, g, sampler=textbook.inverse)
    reference = np_model.sample(params, cfg, noise.numpy(), None if y is None else y.numpy(), g)
    assert torch.isfinite(fast).all() and fast.abs().max() > 1.0
    assert relative_error(fast, slow) < 1e-10
    np.testing.assert_allclose(fast.numpy(), reference, rtol=0, atol=1e-10 * np.abs(reference).max())


@pytest.mark.parametrize("name", ["cond-even-P2", "uncond-odd-P4"])
def test_guidance_changes_the_sample(name):
    """Otherwise the equality tests above could hold with the unconditional branch ignored."""
    cfg, model, params, noise, y = setup(name)
    g = Guidance(1.5, "ab", temperature=0.6)           # tau_u != 1: the only difference for 'uncond'
    assert relative_error(sampling.sample(model, noise, y, g), sampling.sample(model, noise, y)) > 1e-3


def test_unconditional_labels_none_and_negative_agree():
    cfg, model, _, noise, _ = setup("cond-odd-P1-gray")
    g = GUIDANCE["a-annealed-tau"]
    none = sampling.sample(model, noise, None, g)
    negative = sampling.sample(model, noise, torch.full((len(noise),), -1), g)
    assert relative_error(none, negative) == 0.0


@pytest.mark.parametrize("guide", ["none", "a-annealed-tau"])
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_engine_equals_textbook_in_float32(name, guide):
    cfg, model, _, noise, y = setup(name, dtype=torch.float32)
    g = GUIDANCE[guide]
    fast = sampling.sample(model, noise, y, g)
    slow = sampling.sample(model, noise, y, g, sampler=textbook.inverse)
    assert relative_error(fast, slow) < 1e-5


@pytest.mark.parametrize("guide", ["none", "a-annealed-tau"])
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_bfloat16_autocast_against_float64(name, guide):
    """bfloat16 keeps 8 significant bits: 2^-8 = 0.4% per rounding. Measured over these models
    the samples stay within 1.3% of float64 (max error / max value): the bound is 4x that."""
    cfg, model64, _, noise, y = setup(name)
    model32 = make_model(cfg, seed=1, dtype=torch.float32, out_scale=OUT_SCALE)[0]
    g = GUIDANCE[guide]
    reference = sampling.sample(model64, noise, y, g)
    fast = sampling.sample(model32, noise.float(), y, g, bf16=True)
    assert fast.dtype == torch.float32
    assert 1e-4 < relative_error(fast, reference) < 0.05         # bfloat16 really ran, and stayed close


@pytest.mark.parametrize("name", ["cond-even-P2", "uncond-odd-P4"])
def test_linears_cast_once_equal_autocast(name):
    """The engine stores the Linear weights in bfloat16 once; autocast rounds the float32 weights
    the same way at every call, so without guidance (same batch) the samples are identical."""
    cfg, model, _, noise, y = setup(name, dtype=torch.float32)
    fast = sampling.sample(model, noise, y, None, bf16=True)
    slow = sampling.sample(model, noise, y, None, bf16=True, sampler=textbook.inverse)
    assert torch.equal(fast, slow)
    assert relative_error(fast, sampling.sample(model, noise, y)) > 1e-4


def test_an_enclosing_autocast_does_not_leak_into_the_engine():
    """The engine sets its own precision: bf16=False inside a caller's bfloat16 autocast still
    samples in float32, and sampling.block_inverse(bf16=True) equals the bfloat16 engine."""
    cfg, model, _, noise, y = setup("cond-even-P2", dtype=torch.float32)
    g = GUIDANCE["a-annealed-tau"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sampling.inverse(model, noise, y, g)
        block = sampling.block_inverse(model.blocks[1], noise, y, g)
    assert torch.equal(inside, sampling.inverse(model, noise, y, g))
    assert torch.equal(block, sampling.block_inverse(model.blocks[1], noise, y, g))
    bf16 = sampling.block_inverse(model.blocks[1], noise, y, g, bf16=True)
    assert torch.equal(bf16, Engine([model.blocks[1]], len(noise), g, bf16=True).inverse(noise, y))
    assert relative_error(bf16, block) > 1e-4


def test_bfloat16_needs_a_float32_model():
    cfg, model, _, noise, y = setup("cond-even-P2")
    with pytest.raises(ValueError, match="bfloat16 autocast needs a float32 model"):
        sampling.sample(model, noise, y, bf16=True)


def graph_bodies(engine, b, noise, span_of):
    """Decode block b eagerly with Engine.step at the device position (what the CUDA graphs record),
    step t reading span_of(t) cache slots; returns the block's output."""
    engine.load(b, noise)
    with torch.no_grad():
        for t in range(engine.u.shape[1] - 1):
            assert int(engine.position) == t
            engine.step(engine.blocks[b], engine.position, span_of(t))
    return engine.blocks[b].permute(engine.x)


@pytest.mark.parametrize("guide", ["none", "a-annealed-tau"])
@pytest.mark.parametrize("b", [0, 1])
@pytest.mark.parametrize("spans", [1, 3, 16])
def test_graph_body_run_eagerly_equals_the_eager_engine(b, guide, spans):
    """Engine.step at the device position is what the CUDA graphs record: positions come from a device tensor, the
    attention reads the graph's span of cache slots through the mask. Run eagerly with the span
    the engine would replay at each step, it decodes the same block."""
    cfg, model, _, noise, y = setup("cond-even-P2")
    engine = Engine(model.blocks, len(noise), GUIDANCE[guide], spans=spans)
    engine.set_labels(y)
    eager = engine.block_inverse(b, noise)
    graph_body = graph_bodies(engine, b, noise, engine.span_for)
    assert relative_error(graph_body, eager) < 1e-13
    assert relative_error(eager, textbook.block_inverse(model.blocks[b], noise, y, GUIDANCE[guide])) < 1e-12


def test_compiled_engine_equals_the_eager_engine():
    """Engine(compile=True) runs the graph body through torch.compile (on the CPU: without graphs,
    step by step); the fused kernels may round differently, so float32 agreement to 1e-5."""
    cfg, model, _, noise, y = setup("cond-even-P2", dtype=torch.float32)
    g = GUIDANCE["a-annealed-tau"]
    eager = Engine(model.blocks[:1], len(noise), g, spans=2)
    compiled = Engine(model.blocks[:1], len(noise), g, spans=2, compile=True)
    from torch._dynamo.utils import counters
    graphs_before = counters["stats"]["unique_graphs"]
    want, got = eager.inverse(noise, y), compiled.inverse(noise, y)
    assert counters["stats"]["unique_graphs"] > graphs_before               # torch.compile really ran
    assert relative_error(got, want) < 1e-5 and relative_error(got, noise) > 1e-2


def test_a_span_too_short_changes_the_sample():
    """The span really limits what the graph's attention reads: one slot short of the prefix at
    a single step is enough to change the block's output (so the tests above are not vacuous)."""
    cfg, model, _, noise, y = setup("cond-even-P2")
    engine = Engine(model.blocks, len(noise), GUIDANCE["ab"])
    engine.set_labels(y)
    eager = engine.block_inverse(0, noise)
    short = graph_bodies(engine, 0, noise, lambda t: t if t == 5 else t + 1)
    assert relative_error(short[:, :6], eager[:, :6]) == 0.0 and relative_error(short, eager) > 1e-6


@pytest.mark.parametrize("tokens, spans", [(2, 16), (16, 16), (17, 16), (64, 16), (256, 16), (1024, 16),
                                           (1024, 1), (100, 7)])
def test_span_schedule_covers_each_step_tightly(tokens, spans):
    """Step t reads slots 0..t: its graph's span covers them, and overshoots by less than one
    span width, ceil((T - 1) / S): on average (T - 1) / 2S extra slots instead of T - t - 1."""
    ends = span_ends(tokens, spans)
    assert ends == sorted(set(ends)) and ends[-1] == tokens - 1 and len(ends) == min(spans, tokens - 1)
    width = -(-(tokens - 1) // spans)
    for t in range(tokens - 1):
        span = ends[span_index(ends, t)]
        assert t + 1 <= span < t + 1 + width
    assert span_ends(1, spans) == []
    with pytest.raises(ValueError, match="spans must be >= 1, got 0"):
        span_ends(tokens, 0)


def test_sampler_reuses_one_engine_per_batch_size():
    """sampling.Sampler: the same samples as sample(), one Engine (and on CUDA one capture) per
    batch size however many batches are drawn."""
    cfg, model, _, noise, y = setup("cond-even-P2", batch=4)
    g = GUIDANCE["a-annealed-tau"]
    draw = sampling.Sampler(model, g)
    first, second, small = draw(noise[:2], y[:2]), draw(noise[2:], y[2:]), draw(noise[:1], y[:1])
    engines = dict(draw.engines)
    again = draw(noise[:2], y[:2])
    assert sorted(engines) == [1, 2] and draw.engines == engines           # nothing new was built
    assert torch.equal(again, first)
    assert relative_error(torch.cat([first, second]), sampling.sample(model, noise, y, g)) < 1e-13
    assert relative_error(small, sampling.sample(model, noise[:1], y[:1], g)) < 1e-13


def test_caches_are_static_and_the_textbook_caches_grow():
    cfg, model, _, noise, y = setup("cond-even-P2")
    engine = Engine(model.blocks, len(noise), GUIDANCE["ab"])
    engine.block_inverse(0, noise, steps=2)
    cache = engine.caches[0]
    pointer, shape = cache.k.data_ptr(), tuple(cache.k.shape)
    assert shape == (2 * len(noise), cfg.heads, cfg.tokens, cfg.head_dim)     # both branches, all T slots
    engine.block_inverse(0, noise)
    assert cache.k.data_ptr() == pointer and tuple(cache.k.shape) == shape
    growing = textbook.GrowingKVCache()
    k = torch.zeros(1, 2, 1, 4)
    growing.write(k, k, 0)
    first = growing.k.data_ptr()
    growing.write(k, k, 1)
    assert growing.k.shape[2] == 2 and growing.k.data_ptr() != first


def test_prefix_steps_decode_only_the_prefix():
    """The benchmark extrapolates from a prefix: `steps` must decode tokens 1..steps and no more."""
    cfg, model, _, noise, y = setup("cond-even-P2")
    steps = 5
    engine = Engine(model.blocks, len(noise), GUIDANCE["ab"])
    engine.set_labels(y)
    part = engine.block_inverse(0, noise, steps=steps)
    whole = engine.block_inverse(0, noise)
    slow = textbook.block_inverse(model.blocks[0], noise, y, GUIDANCE["ab"], steps=steps)
    assert torch.equal(part[:, steps + 1:], noise[:, steps + 1:])
    assert relative_error(part[:, :steps + 1], whole[:, :steps + 1]) < 1e-13
    assert relative_error(part, slow) < 1e-12


@pytest.mark.parametrize("guide", ["none", "a-annealed-tau", "b-tau"])
def test_guided_conditioner_on_chunks_rewritten_like_jacobi(guide):
    """The GS-Jacobi contract: chunks at increasing starts, and the same chunk written again with
    new tokens (a Jacobi iteration), give the guided a, m of the NumPy reference for the latest tokens."""
    cfg, model, params, noise, y = setup("cond-even-P2")
    b, g = 1, GUIDANCE[guide]
    blk, torch_block = block(params, b), model.blocks[b]
    x = torch_block.permute(noise)
    caches = new_caches(torch_block, cfg.tokens)
    np_caches = (np_new_caches(cfg, len(x)), np_new_caches(cfg, len(x)))
    ny = y.numpy()
    start = 0
    with torch.no_grad():
        for n in [3, 1, 5, 4, 3]:
            chunk = x[:, start:start + n]
            guided_conditioner(torch_block, chunk * 0.5, y, start, caches, g)      # a first iterate
            a, m = guided_conditioner(torch_block, chunk, y, start, caches, g)       # overwritten
            want_a, want_m = np_guided_conditioner(blk, chunk.numpy(), ny, cfg, start, np_caches, g)
            np.testing.assert_allclose(a.numpy(), want_a, rtol=1e-11, atol=1e-12)
            np.testing.assert_allclose(m.numpy(), want_m, rtol=1e-11, atol=1e-12)
            start += n


@pytest.mark.parametrize("guide", ["none", "a-annealed-tau"])
def test_gs_jacobi_on_the_engine_equals_numpy_gs_jacobi(guide):
    cfg, model, params, noise, y = setup("cond-even-P2")
    strategy = parse_strategy("G=[4,1] J=[3,5] guess=[0,1]", cfg)
    g = GUIDANCE[guide]
    fast = sample_gsj(model, noise, y, strategy, g)
    reference = np_model.sample(params, cfg, noise.numpy(), y.numpy(), g, sampler=np_jacobi.gs_jacobi(strategy))
    np.testing.assert_allclose(fast.numpy(), reference, rtol=0, atol=1e-10 * np.abs(reference).max())
    # few iterations: GS-Jacobi is not yet the sequential inverse, so the comparison is not trivial
    assert relative_error(fast, sampling.sample(model, noise, y, g)) > 1e-6


def test_clear_errors():
    cfg, model, _, noise, y = setup("cond-even-P2")
    engine = Engine(model.blocks, len(noise))
    with pytest.raises(ValueError, match="built for batch 3, got a batch of 2"):
        engine.block_inverse(0, noise[:2])
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        Engine(model.blocks, len(noise), graphs=True)
    cache = KVCache(cfg.tokens)
    k = torch.zeros(2, cfg.heads, 1, cfg.head_dim, dtype=torch.float64)
    cache.write(k, k, 0)
    with pytest.raises(ValueError, match="use new caches for another batch size"):
        cache.write(torch.cat([k, k]), torch.cat([k, k]), 1)
    with pytest.raises(ValueError, match="a growing cache appends: expected position 0, got 3"):
        textbook.GrowingKVCache().write(k, k, 3)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA graphs need a CUDA device; their body is checked eagerly on the CPU by "
                           "test_graph_body_run_eagerly_equals_the_eager_engine")
@pytest.mark.parametrize("guide", ["none", "a-annealed-tau"])
def test_cuda_graph_replay_equals_eager(guide):
    cfg, model, _, noise, y = setup("cond-even-P2", dtype=torch.float32)
    model, noise, y, g = model.cuda(), noise.cuda(), y.cuda(), GUIDANCE[guide]
    graphed = Engine(model.blocks, len(noise), g)
    assert graphed.graphs
    with torch.no_grad():
        got = graphed.inverse(noise, y)
        again = graphed.inverse(noise, y)                # replay with the graphs already captured
        eager = Engine(model.blocks, len(noise), g, graphs=False).inverse(noise, y)
        slow = textbook.inverse(model, noise, y, g)
        bf16 = Engine(model.blocks, len(noise), g, bf16=True).inverse(noise, y)
        slow_bf16 = textbook.inverse(model, noise, y, g, bf16=True)
    assert torch.equal(got, again)
    assert relative_error(got, eager) < 1e-5 and relative_error(got, slow) < 1e-5
    assert relative_error(bf16, slow_bf16) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA graphs need a CUDA device; the compiled body is checked on the CPU by "
                           "test_compiled_engine_equals_the_eager_engine")
def test_cuda_compiled_graphs_equal_eager():
    """torch.compile's kernels captured in the CUDA graphs (the warm-up compiles before capture)."""
    cfg, model, _, noise, y = setup("cond-even-P2", dtype=torch.float32)
    model, noise, y, g = model.cuda(), noise.cuda(), y.cuda(), GUIDANCE["a-annealed-tau"]
    with torch.no_grad():
        compiled = Engine(model.blocks, len(noise), g, compile=True).inverse(noise, y)
        eager = Engine(model.blocks, len(noise), g, graphs=False).inverse(noise, y)
    assert relative_error(compiled, eager) < 1e-5


def test_benchmark_runs_and_reports_agreeing_samplers(tmp_path):
    """benchmarks/sampling.py on the small 'quick' model, prefix mode (a few seconds)."""
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).parents[1] / "benchmarks" / "sampling.py"
    spec = importlib.util.spec_from_file_location("benchmark_sampling", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    bench.main(["--configs", "quick", "--batch", "2", "--max-steps", "3", "--repeat", "1", "--device", "cpu",
                "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["textbook_steps"] == row["engine_steps"] == 3 and row["batch"] == 2
    assert 0 < row["max_abs_diff"] < 1e-4 * row["max_abs_value"]
    assert row["textbook_s"] > 0 and row["engine_s"] > 0 and row["forward_s"] > 0
