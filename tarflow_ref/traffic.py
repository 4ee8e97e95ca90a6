"""The memory-traffic floor of exact sequential sampling: the bytes any sampler that decodes token
by token with a KV cache must move between memory and the chip (book/checkpoints.md, "Inverse,
guidance and sampling"; Zhai et al. 2024, Sec. 2.2; book/sampling_speed.md, "The floor").

A block's inverse takes T - 1 steps, t = 0..T-2; step t pushes token t of R rows (R = 2B with
guidance: both branches in one batch, R = B without) through the block and needs

    every parameter the step uses, once:   P_step = P_block + C (one pos_embed row) + C * K_step
    the keys and values of tokens 0..t:    2 C R (t + 1) values per layer         (cache read)
    the key and value of token t:          2 C R values per layer                 (cache write)

with P_block the values of proj_in, the L layers' layer norms, qkv, proj and MLP Linear weights
and biases, and proj_out:

    P_block = (D C + C) + L (12 C^2 + 9 C + 4 C) + (2 D C + 2 D)

and K_step the class-embedding rows one step reads: one per label of the batch, counted as
min(B, K) (fewer when labels repeat), plus the mean row of the unconditional branch with guidance
(computed once per sampling call, then read like any row); 0 for unconditional models. Over the
N blocks, with b bytes per value (bf16: 2) and sum_{t=0}^{T-2} (t + 1) = T (T - 1) / 2:

    weights  = N (T - 1) P_step b
    kv_read  = N L R 2C b T (T - 1) / 2
    kv_write = N L R 2C b (T - 1)
    total    = weights + kv_read + kv_write

The K/V term grows as T^2 and dominates at T = 1024: AFHQ-256 at B = 32 with guidance in bf16
reads 6.59e12 bytes of keys and values and 0.94e12 of weights. A cache read in full (all T slots
at every step) would make kv_read N L R 2C b T (T - 1): twice as much.

Not counted, on purpose:
- activations: the token's hidden states, about 18 C values per row and layer (qkv, attention
  output, projections, layer norms, MLP hidden before and after GELU, residuals); a fused step
  keeps them on chip, and even written and read once each through memory they would add only
  36 C R per layer and step, 3-8 % of the total for the released configurations at B = 32;
- the step's input and output tokens (3 D R values) and the attention mask (never needed:
  one query attends to every cached key);
- dtype mixes: under bf16 autocast the layer norms and embeddings stay float32, under 0.1 % of
  the weights; every value is counted at b bytes.
"""
import math

from .config import TarFlowConfig


def block_parameters_read(cfg: TarFlowConfig, batch: int, guided: bool) -> int:
    """P_step: the parameter values one step of one block reads (module docstring)."""
    check_batch(batch)
    C, D, L = cfg.width, cfg.token_dim, cfg.layers
    layer = 2 * (2 * C) + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    class_rows = min(batch, cfg.num_classes) + int(guided) if cfg.conditional else 0
    return (D * C + C) + L * layer + (2 * D * C + 2 * D) + C + class_rows * C


def sequential_traffic(cfg: TarFlowConfig, batch: int, guided: bool, bytes_per_value: int = 2) -> dict:
    """Bytes moved at least by an exact sequential sampler with a KV cache, over all N blocks.

    Returns {'weights', 'kv_read', 'kv_write', 'total'} (ints, bytes); rows R = 2 batch when guided.
    """
    check_batch(batch)
    if isinstance(bytes_per_value, bool) or not isinstance(bytes_per_value, int) or bytes_per_value < 1:
        raise ValueError(f"bytes_per_value must be a positive integer (bf16: 2), got {bytes_per_value!r}")
    T, N, L, C = cfg.tokens, cfg.blocks, cfg.layers, cfg.width
    rows = 2 * batch if guided else batch
    steps = N * (T - 1)
    kv_row = L * rows * 2 * C * bytes_per_value          # keys and values of one position, every layer
    traffic = {"weights": steps * block_parameters_read(cfg, batch, guided) * bytes_per_value,
               "kv_read": N * kv_row * T * (T - 1) // 2,
               "kv_write": steps * kv_row}
    traffic["total"] = sum(traffic.values())
    return traffic


def floor_seconds(traffic: dict, bandwidth: float) -> float:
    """traffic['total'] / bandwidth: the time at `bandwidth` bytes per second (H200: 4.8e12 nominal)."""
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not math.isfinite(bandwidth) \
            or bandwidth <= 0:
        raise ValueError(f"bandwidth must be a finite positive number of bytes per second, got {bandwidth!r}")
    return traffic["total"] / bandwidth


def check_batch(batch):
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
