"""The sampling engine: the exact sequential inverse of the flow blocks (book/checkpoints.md,
"Inverse, guidance and sampling"), fast. The readable loop it equals is textbook.py.

Inside a block, in its token order, with z: [B, T, D] the block's input noise:

    x_0 = z_0,    x_{t+1} = z_{t+1} * exp(a_t) + m_t,    (a_t, m_t) = f(x_0..x_t),   t = 0..T-2

with classifier-free guidance (guidance.py) on a_t, m_t. Each step is one token through L
transformer layers: little arithmetic and many small kernels, so a plain loop is bound by
per-token Python work, kernel launches and cache copies (book/sampling_speed.md). The engine
computes the same numbers without those costs:

1. Static KV caches, [2B, H, T, d] per layer, allocated once and written in place at the
   step's position; attention reads the written prefix. Inside a CUDA graph shapes are frozen,
   so the graph of span s reads slots 0..s-1 through the causal mask: each block has one graph
   per span s_j = ceil((j + 1)(T - 1) / S), j < S (S = 16), and step t replays the smallest
   span >= t + 1. Reading all T slots at every step would double the dominant memory traffic
   at large T (book/sampling_speed.md); these spans add (T - 1) / 2S slots per step on average.
2. Guidance's two branches in ONE pass over a batch of 2B: tokens [x; x], labels [y; -1]
   ("no label" = mean class embedding) and a per-sample temperature [1; tau_u]: [2B, 1, 1, 1].
3. The per-token step (all layers, guidance, the affine update, t <- t + 1) reads and writes
   only static buffers and a 0-dim device tensor t (positions are views of it, the causal mask
   rows additive), so on CUDA it is captured as CUDA graphs (one per block and span) and
   replayed T - 1 times per block: one launch per token.
4. bfloat16 on CUDA: autocast, as the released evaluation samples, with the Linear weights cast
   to bfloat16 once (inside a graph autocast cannot cache its casts and would redo them at
   every step). Autocast rounds the float32 weights the same way, so the numbers are the same.

On the CPU the same step runs eagerly, with integer positions. `guided_conditioner` on
`new_caches` is how every torch sampler evaluates a block (sequential and GS-Jacobi).
"""
import bisect
import contextlib
import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..guidance import Guidance, guide
from .precision import check_bf16_model, wide

SPANS = 16            # CUDA graphs per block, each reading a longer prefix of the caches


def positions(start, n, device):
    """[n] long: start..start+n-1. `start` is an int, or a 0-dim device tensor: the position of
    the CUDA graph, which must stay on the device (no host sync). One position of a tensor start
    is a view of it: no kernels (arange and add) in the graph's step."""
    if torch.is_tensor(start) and n == 1:
        return start.reshape(1)
    return start + torch.arange(n, device=device)


def rows(t, start, n, dim=0):
    """Entries start..start+n-1 of t along `dim`: a view for an int start, a copy for a tensor one."""
    if torch.is_tensor(start):
        return t.index_select(dim, positions(start, n, t.device))
    return t.narrow(dim, start, n)


def write_rows(t, start, values, dim):
    """t[..., start:start+n, ...] = values along `dim`, in place (n = values.shape[dim])."""
    if torch.is_tensor(start):
        t.index_copy_(dim, positions(start, values.shape[dim], t.device), values)
    else:
        t.narrow(dim, start, values.shape[dim]).copy_(values)


def attention_bias(allowed, h):
    """The causal mask's rows allowed: [n, T] bool as SDPA's additive form: 0 where a query may
    attend, -inf elsewhere, in the dtype the queries computed from h will have (autocast's for
    float32 activations under autocast; autocast leaves float64 alone). SDPA would make this from
    a boolean mask at every layer (a few small kernels each); the conditioner makes it once."""
    autocast = torch.is_autocast_enabled(h.device.type) and h.dtype == torch.float32
    dtype = torch.get_autocast_dtype(h.device.type) if autocast else h.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


class KVCache:
    """Keys and values of positions 0..T-1 for one layer: [B', H, T, d] (B' = 2B with guidance),
    allocated at the first write in that write's dtype (float64 in tests, bfloat16 under
    autocast) and written in place ever after: no concatenation per token."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.k = self.v = None

    def write(self, k, v, start, span=None):
        """k, v: [B', H, n, d] at positions start..start+n-1 -> keys, values to attend to.

        start: an int (returns positions 0..start+n-1), or a 0-dim device tensor, as in the CUDA
        graph, which reads the first `span` slots (they must cover the positions written so far;
        the attention's causal mask hides the later ones).
        """
        if self.k is None:
            shape = (*k.shape[:2], self.tokens, k.shape[-1])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        elif k.shape[:2] != self.k.shape[:2] or k.dtype != self.k.dtype:
            raise ValueError(f"this cache holds keys [{', '.join(map(str, self.k.shape[:2]))}, T, d] "
                             f"in {self.k.dtype}, got [{', '.join(map(str, k.shape[:2]))}, n, d] in {k.dtype}: "
                             "use new caches for another batch size, guidance setting or precision")
        write_rows(self.k, start, k, dim=2)
        write_rows(self.v, start, v, dim=2)
        if torch.is_tensor(start):
            if span is None:
                raise ValueError("a device position reads a span of cache slots: pass span")
            end = span
        else:
            end = start + k.shape[2]
        return self.k.narrow(2, 0, end), self.v.narrow(2, 0, end)

    def clear(self):
        """Zero the slots: a stale NaN in a masked slot would still poison the attention (0 * NaN)."""
        if self.k is not None:
            self.k.zero_()
            self.v.zero_()


def new_caches(block, tokens):
    """One KVCache per transformer layer of `block`; both guidance branches share each one."""
    return [KVCache(tokens) for _ in block.attn_blocks]


def attend(attention, h, start, cache, temperature, bias, span):
    """model.Attention.forward on a static cache: temperature a float or per sample [B', 1, 1, 1],
    bias the additive mask rows [n, T] (None: every key given), span as in KVCache.write."""
    q, k, v = attention.queries_keys_values(h)
    if torch.is_tensor(temperature):
        # divided in at least float32 so that tau_u is not rounded to bfloat16
        q, temperature = (wide(q) / temperature).to(q.dtype), 1.0
    k, v = cache.write(k, v, start, span)
    scale = 1.0 / (q.shape[-1] ** 0.5 * temperature)
    mask = None if bias is None else bias[:, :k.shape[2]]
    return attention.output(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale))


def conditioner(block, u, y, start, caches, temperature=1.0, span=None):
    """model.MetaBlock.conditioner on static caches: raw a, m: [B', n, D] at positions start..start+n-1."""
    n = u.shape[1]
    pos = rows(block.permute(block.pos_embed, dim=0), start, n)
    h = block.proj_in(u) + pos + block.class_embedding(y, u.shape[0])
    # one query attending to every key it is given needs no mask, and SDPA is faster without
    # one; at a device position the static cache hands over a span of slots, so mask the future
    bias = None if n == 1 and not torch.is_tensor(start) else attention_bias(rows(block.attn_mask, start, n) > 0, h)
    for layer, cache in zip(block.attn_blocks, caches):
        h = h + attend(layer.attention, h, start, cache, temperature, bias, span)
        h = h + layer.mlp(h)
    o = block.proj_out(h)
    return o[..., :block.token_dim], o[..., block.token_dim:]


def guided_conditioner(block, x, y, start, caches, guidance: Guidance | None, span=None):
    """Guided a, m: [B, n, D] for the tokens x: [B, n, D] at positions start..start+n-1 of the
    block order, writing their keys and values into `caches` (from `new_caches`).

    y: [B] labels (< 0: none) or None; start: an int or a 0-dim device tensor (with its span).
    With guidance, both branches run as one batch of 2B.
    """
    if guidance is None or not guidance.active:
        return conditioner(block, x, y, start, caches, span=span)
    B, n = x.shape[:2]
    no_label = torch.full((B,), -1, dtype=torch.long, device=x.device)
    labels = torch.cat([no_label if y is None else y, no_label])                           # [2B]
    temperature = 1.0
    if guidance.temperature != 1.0:
        ones = torch.ones(B, 1, 1, 1, dtype=wide(x).dtype, device=x.device)
        temperature = torch.cat([ones, ones * guidance.temperature])                        # [2B, 1, 1, 1]
    a, m = conditioner(block, torch.cat([x, x]), labels, start, caches, temperature, span)  # [2B, n, D]
    g = guidance.weight_at(positions(start, n, x.device).to(x.dtype)[:, None], block.pos_embed.shape[0])  # [n, 1]
    return guide(a[:B], m[:B], a[B:], m[B:], guidance, g)


def engine_precision(device, bf16: bool, cache_enabled: bool = True):
    """The engine's own precision: bfloat16 autocast or none, whatever the caller's context is
    (an enclosing autocast would otherwise leak into the engine and its captured graphs), and
    SDPA without cuDNN's attention, whose replays were not bit-repeatable (benchmarks/RESULTS.md;
    on the CPU SDPA has no such kernel)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=cache_enabled))
    stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))
    return stack


def span_ends(tokens: int, spans: int) -> list:
    """The prefix lengths the CUDA graphs of a block read: ceil((j + 1)(T - 1) / S), j < S,
    without repeats (S > T - 1 gives every length 1..T-1); none for T = 1 (nothing to decode)."""
    if spans < 1:
        raise ValueError(f"spans must be >= 1, got {spans}")
    return sorted({math.ceil((j + 1) * (tokens - 1) / spans) for j in range(spans)} - {0})


def span_index(ends: list, t: int) -> int:
    """The graph for step t: the shortest span in `ends` covering the slots it reads, 0..t."""
    return bisect.bisect_left(ends, t + 1)


def bf16_linears(block):
    """A copy of the block with its Linear weights and biases stored in bfloat16 (for autocast)."""
    block = copy.deepcopy(block)
    for module in block.modules():
        if isinstance(module, nn.Linear):
            module.to(torch.bfloat16)
    return block


class Engine:
    """The sequential inverse of a list of flow blocks, for one batch size and guidance setting.

    All blocks share one set of static buffers: u, x: [B, T, D] (the block's input and the
    decoded tokens, block order), the labels y: [B] (-1 = none), the position t (0-dim) and the
    KV caches. `graphs` (default: on CUDA) captures one CUDA graph per block and span (span_ends),
    at the first `inverse` or by `capture()`; build one Engine and call `inverse` again for more
    batches of the same size, so that the capture is paid once.

    `compile` runs the step at the device position through torch.compile (dynamic shapes: one
    compilation serves every span; the warm-up before the capture compiles it), which fuses the
    step's small element-wise kernels; the numbers may differ from the eager step by float
    rounding. An experiment for the GPU (book/sampling_speed.md); off by default.
    """

    def __init__(self, blocks, batch: int, guidance: Guidance | None = None, bf16: bool = False, *,
                 graphs: bool | None = None, spans: int = SPANS, compile: bool = False):
        first = blocks[0]
        device, dtype = first.pos_embed.device, first.pos_embed.dtype
        graphs = device.type == "cuda" if graphs is None else graphs
        if graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, this one is on '{device.type}'")
        if bf16:
            check_bf16_model(dtype)
        self.blocks = [bf16_linears(b) for b in blocks] if bf16 else list(blocks)
        self.guidance, self.bf16, self.graphs, self.device = guidance, bf16, graphs, device
        tokens, token_dim = first.pos_embed.shape[0], first.token_dim
        self.u = torch.zeros(batch, tokens, token_dim, dtype=dtype, device=device)
        self.x = torch.zeros_like(self.u)
        self.y = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.caches = new_caches(first, tokens)
        self.spans = span_ends(tokens, spans)
        self.captured = None                     # captured[b][j]: the graph of block b and span j
        self.compiled = compile
        # what the CUDA graphs record: the step at the device position
        self.graph_body = torch.compile(self.step, dynamic=True) if compile else self.step

    def step(self, block, t, span=None):
        """Token t+1 from tokens 0..t of the static buffers. t: an int (eager), or the device
        position self.position with the `span` of cache slots to read (the CUDA graph's body,
        where an int would be frozen at capture); the step then advances the device position."""
        a, m = guided_conditioner(block, rows(self.x, t, 1, dim=1), self.y, t, self.caches, self.guidance, span)
        write_rows(self.x, t + 1, rows(self.u, t + 1, 1, dim=1) * torch.exp(wide(a)) + m, dim=1)  # [B, 1, D]
        if torch.is_tensor(t):
            t.add_(1)

    def span_for(self, t: int) -> int:
        """The cache slots the graph of step t reads (span_index)."""
        return self.spans[span_index(self.spans, t)]

    def decode(self, b: int, t: int):
        """Step t of block b, after `load`: a graph replay, the compiled step, or the eager step."""
        if self.captured:
            self.captured[b][span_index(self.spans, t)].replay()
        elif self.compiled:
            self.graph_body(self.blocks[b], self.position, self.span_for(t))
        else:
            self.step(self.blocks[b], t)

    @torch.no_grad()
    def capture(self) -> float:
        """Record the CUDA graphs of every block and span, after one eager warm-up step of each on
        a side stream (at the span's last position: it initialises cuBLAS, allocates the caches
        and, with `compile`, compiles the step); returns seconds."""
        torch.cuda.synchronize()
        started = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), engine_precision(self.device, self.bf16):
            for block in self.blocks:
                for span in self.spans:
                    self.position.fill_(span - 1)
                    self.graph_body(block, self.position, span)
        torch.cuda.current_stream().wait_stream(side)
        self.captured, pool = [], None
        for block in self.blocks:
            self.captured.append([])
            for span in self.spans:
                graph = torch.cuda.CUDAGraph()
                # the graphs run one after another and keep nothing between replays (every tensor
                # they leave behind is a static buffer made outside them), so they share one pool
                with torch.cuda.graph(graph, pool=pool), engine_precision(self.device, self.bf16, cache_enabled=False):
                    self.graph_body(block, self.position, span)
                pool = graph.pool()
                self.captured[-1].append(graph)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    def set_labels(self, y):
        """y: [B] labels (< 0: none) or None, for every block until set again."""
        if y is None:
            self.y.fill_(-1)
        else:
            self.y.copy_(y)

    def load(self, b: int, z):
        """Set the static buffers up for decoding block b from z: [B, T, D] (image order)."""
        if self.u.shape[0] != z.shape[0]:
            raise ValueError(f"this engine was built for batch {self.u.shape[0]}, got a batch of {z.shape[0]}")
        self.u.copy_(self.blocks[b].permute(z))
        self.x.copy_(self.u)                               # x_0 = z_0; later tokens are overwritten in turn
        self.position.zero_()
        for cache in self.caches:
            cache.clear()

    @torch.no_grad()
    def block_inverse(self, b: int, z, steps: int | None = None):
        """Noise -> data for block b. z: [B, T, D] (image order) -> x: [B, T, D].

        `steps` decodes only tokens 1..steps (the benchmark times such a prefix).
        """
        self.load(b, z)
        tokens = self.u.shape[1]
        steps = tokens - 1 if steps is None else min(steps, tokens - 1)
        with engine_precision(self.device, self.bf16):
            for t in range(steps):
                self.decode(b, t)
        return self.blocks[b].permute(self.x).clone()

    @torch.no_grad()
    def inverse(self, z, y=None, progress=None):
        """Tokens z: [B, T, D] -> data tokens, blocks last to first. `progress` wraps the block loop."""
        if self.graphs and self.captured is None:
            self.capture()
        self.set_labels(y)
        order = range(len(self.blocks) - 1, -1, -1)
        for b in (progress(order) if progress else order):
            z = self.block_inverse(b, z)
        return z
