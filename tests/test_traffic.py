"""The memory-traffic floor (tarflow_ref/traffic.py) against independent counts: the parameters of
real torch blocks, the keys and values the engine's KV caches actually hand to attention while
decoding, and the AFHQ-256 figures of book/sampling_speed.md."""
import math

import pytest
import torch

from tarflow_ref import Guidance, TarFlow, TarFlowConfig
from tarflow_ref.torch_backend.engine import KVCache, guided_conditioner
from tarflow_ref.traffic import block_parameters_read, floor_seconds, sequential_traffic

from conftest import SMALL_CONFIGS, make_model


class CountingKVCache(KVCache):
    """An engine cache that counts the values written into it and handed back to attention."""

    def __init__(self, tokens):
        super().__init__(tokens)
        self.written = self.read = 0

    def write(self, k, v, start, span=None):
        self.written += k.numel() + v.numel()
        k_all, v_all = super().write(k, v, start, span)
        self.read += k_all.numel() + v_all.numel()
        return k_all, v_all


def parameters_one_step_reads(block, labels, guided):
    """Every parameter of the block, but of the embedding tables only the rows one step uses:
    pos_embed at the step's position, class_embed at the batch's distinct labels (+ their mean)."""
    C = block.pos_embed.shape[1]
    count = sum(p.numel() for p in block.parameters()) - block.pos_embed.numel() + C
    if block.class_embed is not None:
        count += -block.class_embed.numel() + (len(set(labels)) + guided) * C
    return count


@pytest.mark.parametrize("batch", [1, 3, 7])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_weights_are_the_block_parameters_one_step_reads(name, guided, batch):
    cfg = SMALL_CONFIGS[name]
    model, _ = make_model(cfg)
    labels = [i % cfg.num_classes for i in range(batch)] if cfg.conditional else []
    per_step = parameters_one_step_reads(model.blocks[0], labels, guided)
    assert block_parameters_read(cfg, batch, guided) == per_step
    traffic = sequential_traffic(cfg, batch, guided, bytes_per_value=4)
    assert traffic["weights"] == cfg.blocks * (cfg.tokens - 1) * per_step * 4


@pytest.mark.parametrize("guidance", [None, Guidance(1.5, "ab", annealed=True, temperature=0.7)])
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_cache_traffic_is_what_the_engine_reads_and_writes(name, guidance):
    """Decode every block token by token through the engine's guided_conditioner with counting
    caches; the bytes attention receives and the bytes written are the formula's kv terms."""
    cfg = SMALL_CONFIGS[name]
    model, _ = make_model(cfg)
    batch, T = 3, cfg.tokens
    x = torch.randn(batch, T, cfg.token_dim, dtype=torch.float64)
    y = torch.tensor([0, 1, -1]) if cfg.conditional else None
    read = written = 0
    with torch.no_grad():
        for block in model.blocks:
            caches = [CountingKVCache(T) for _ in block.attn_blocks]
            for t in range(T - 1):
                guided_conditioner(block, x[:, t:t + 1], y, t, caches, guidance)
            read += sum(c.read for c in caches)
            written += sum(c.written for c in caches)
    traffic = sequential_traffic(cfg, batch, guidance is not None, bytes_per_value=x.element_size())
    assert read > 0 and traffic["kv_read"] == read * x.element_size()
    assert traffic["kv_write"] == written * x.element_size()
    assert traffic["total"] == traffic["weights"] + traffic["kv_read"] + traffic["kv_write"]


def test_afhq_256_batch_32_guided_bf16():
    """The book's figures: 6.59e12 bytes of K/V reads, 0.94e12 of weights, 1.57 s at 4.8 TB/s,
    against an explicit loop over the steps and the parameters of a (meta, storage-free) model."""
    cfg = TarFlowConfig.from_release_name("afhq_model_8_768_8_8_0.07.pth")
    assert (cfg.tokens, cfg.width, cfg.layers, cfg.blocks) == (1024, 768, 8, 8)
    rows, kv_read = 2 * 32, 0
    for t in range(cfg.tokens - 1):
        kv_read += cfg.blocks * cfg.layers * rows * cfg.width * 2 * 2 * (t + 1)
    with torch.device("meta"):
        block = TarFlow(cfg).blocks[0]
    weights = cfg.blocks * (cfg.tokens - 1) * parameters_one_step_reads(block, range(3), True) * 2
    traffic = sequential_traffic(cfg, 32, guided=True, bytes_per_value=2)
    assert traffic["kv_read"] == kv_read and f"{kv_read:.3g}" == "6.59e+12"
    assert traffic["weights"] == weights and f"{weights:.2g}" == "9.4e+11"
    assert round(floor_seconds(traffic, 4.8e12), 2) == 1.57
    assert floor_seconds(traffic, 4.8e12) < 5 * 2 * 0.19          # 5x two forward passes is not below the floor


def test_bad_input_is_named():
    cfg = SMALL_CONFIGS["cond-even-P2"]
    for batch in [0, -1, 1.5, True]:
        with pytest.raises(ValueError, match="batch must be a positive integer"):
            sequential_traffic(cfg, batch, guided=True)
    for size in [0, 2.0, True]:
        with pytest.raises(ValueError, match="bytes_per_value must be a positive integer"):
            sequential_traffic(cfg, 2, guided=True, bytes_per_value=size)
    traffic = sequential_traffic(cfg, 2, guided=False)
    for bandwidth in [0, -1.0, math.nan, math.inf, "4.8e12"]:
        with pytest.raises(ValueError, match="bandwidth must be a finite positive number"):
            floor_seconds(traffic, bandwidth)
