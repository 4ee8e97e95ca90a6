"""TarFlow as a torch nn.Module whose state_dict() has exactly the released keys and shapes.

Each class mirrors one NumPy concept module (attention.py, flow.py, model.py): same names, same
equations, proven equal by tests/test_torch_vs_numpy.py. Keys (SPEC, "The released files"):

    var                                              [T, D]
    blocks.{b}.pos_embed / class_embed / attn_mask   [T, C] / [K, 1, C] / [T, T]
    blocks.{b}.proj_in / proj_out                    Linear(D, C) / Linear(C, 2D)
    blocks.{b}.attn_blocks.{l}.attention.{norm,qkv,proj}
    blocks.{b}.attn_blocks.{l}.mlp.{norm,main.0,main.2}
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import TarFlowConfig
from ..flow import check_labels
from ..logdet import loss as flow_loss
from ..model import check_image
from ..patchify import patchify


def wide(t):
    """At least float32: exp and means of bfloat16 values lose too much (the recipe does the same)."""
    return t.float() if t.element_size() < 4 else t


def positions(start, n, device):
    """[n] long: start..start+n-1. `start` is an int, or a 0-dim device tensor: the position of
    the sampling engine's CUDA graph, which must stay on the device (no host sync). One position
    of a tensor start is a view of it: no kernels (arange and add) in the graph's step."""
    if torch.is_tensor(start) and n == 1:
        return start.reshape(1)
    return start + torch.arange(n, device=device)


def attention_bias(allowed, h):
    """The causal mask's rows allowed: [n, T] bool as SDPA's additive form: 0 where a query may
    attend, -inf elsewhere, in the dtype the queries computed from h will have (autocast's for
    float32 activations under autocast; autocast leaves float64 alone). SDPA would make this from
    a boolean mask at every layer (a few small kernels each); the conditioner makes it once."""
    autocast = torch.is_autocast_enabled(h.device.type) and h.dtype == torch.float32
    dtype = torch.get_autocast_dtype(h.device.type) if autocast else h.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def rows(t, start, n, dim=0):
    """Entries start..start+n-1 of t along `dim`: a view for an int start, a copy for a tensor one."""
    if torch.is_tensor(start):
        return t.index_select(dim, positions(start, n, t.device))
    return t.narrow(dim, start, n)


class Attention(nn.Module):
    """Pre-norm causal multi-head attention; see tarflow_ref/attention.py for the math."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h, allowed, start=0, cache=None, temperature=1.0):
        """h: [B, n, C] at positions start..start+n-1; allowed: the causal mask's rows of these
        positions, [n, T], as booleans (True = may attend) or in additive form (attention_bias:
        0 / -inf; NOT the 1 / 0 of the attn_mask buffer), or None: attend to every key given.
        temperature: a float, or a per-sample tensor [B, 1, 1, 1]."""
        qkv = self.qkv(self.norm(h))
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if torch.is_tensor(temperature):
            # per sample, [B, 1, 1, 1]: guidance's two branches in one batch (sampling engine);
            # divided in at least float32 so that tau_u is not rounded to bfloat16
            q, temperature = (wide(q) / temperature).to(q.dtype), 1.0
        if cache is not None:
            k, v = cache.write(k, v, start)
        elif start != 0:
            raise ValueError("attention at a later position needs the cache of the earlier tokens")
        scale = 1.0 / (q.shape[-1] ** 0.5 * temperature)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if allowed is None else allowed[:, :k.shape[2]],
                                             scale=scale)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.main = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h):
        return self.main(self.norm(h))


class AttentionBlock(nn.Module):
    """One pre-norm transformer layer: h += Attn(LN(h)); h += MLP(LN(h))."""

    def __init__(self, width, heads):
        super().__init__()
        self.attention = Attention(width, heads)
        self.mlp = MLP(width)

    def forward(self, h, allowed, start=0, cache=None, temperature=1.0):
        h = h + self.attention(h, allowed, start, cache, temperature)
        return h + self.mlp(h)


class MetaBlock(nn.Module):
    """One affine autoregressive flow block (tarflow_ref/flow.py). Odd blocks reverse the tokens."""

    def __init__(self, cfg: TarFlowConfig, reverse: bool):
        super().__init__()
        T, C, D = cfg.tokens, cfg.width, cfg.token_dim
        self.reverse = reverse
        self.token_dim = D
        self.pos_embed = nn.Parameter(torch.randn(T, C) * 1e-2)
        if cfg.num_classes:
            self.class_embed = nn.Parameter(torch.randn(cfg.num_classes, 1, C) * 1e-2)
        else:
            self.class_embed = None
        self.register_buffer("attn_mask", torch.tril(torch.ones(T, T)))
        self.proj_in = nn.Linear(D, C)
        self.attn_blocks = nn.ModuleList(AttentionBlock(C, cfg.heads) for _ in range(cfg.layers))
        self.proj_out = nn.Linear(C, 2 * D)
        # the recipe starts every block at the identity map
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def permute(self, x, dim=1):
        return x.flip(dim) if self.reverse else x

    def class_embedding(self, y, batch):
        """[B, 1, C] (or 0): y None, y < 0 and the unconditional branch use the mean over classes."""
        if self.class_embed is None:
            return 0.0
        mean = self.class_embed.mean(0)                                        # [1, C]
        if y is None:
            return mean.expand(batch, *mean.shape)
        return torch.where((y < 0)[:, None, None], mean, self.class_embed[y.clamp(min=0)])

    def conditioner(self, u, y, start=0, caches=None, temperature=1.0):
        """Raw a, m: [B, n, D] at positions start..start+n-1 of the block order (before the shift)."""
        n = u.shape[1]
        pos = rows(self.permute(self.pos_embed, dim=0), start, n)
        h = self.proj_in(u) + pos + self.class_embedding(y, u.shape[0])
        # one query attending to every key it is given needs no mask, and SDPA is faster without
        # one; at a device position (CUDA graph) the static cache hands over a span of slots, so
        # mask the future. The rows are made once for all layers: [n, T].
        allowed = None if n == 1 and not torch.is_tensor(start) else \
            attention_bias(rows(self.attn_mask, start, n) > 0, h)
        for l, layer in enumerate(self.attn_blocks):
            h = layer(h, allowed, start, None if caches is None else caches[l], temperature)
        o = self.proj_out(h)
        return o[..., :self.token_dim], o[..., self.token_dim:]

    def forward(self, x, y=None):
        """x: [B, T, D] (image order) -> z: [B, T, D], logdet: [B] (mean over T*D, SPEC)."""
        u = self.permute(x)
        a, m = self.conditioner(u, y)
        a = F.pad(a[:, :-1], (0, 0, 1, 0))       # the shift: o'_t = o_{t-1}, o'_0 = 0
        m = F.pad(m[:, :-1], (0, 0, 1, 0))
        a = wide(a)
        z = (u - m) * torch.exp(-a)
        return self.permute(z), -a.mean(dim=(1, 2))


class TarFlow(nn.Module):
    """The whole flow. forward: image [B, c, S, S] -> z [B, T, D], logdet [B]."""

    def __init__(self, cfg: TarFlowConfig):
        super().__init__()
        self.config = cfg
        self.register_buffer("var", torch.ones(cfg.tokens, cfg.token_dim))
        self.blocks = nn.ModuleList(MetaBlock(cfg, reverse=b % 2 == 1) for b in range(cfg.blocks))

    def forward(self, x, y=None):
        check_image(x, self.config)
        check_labels(y, self.config.num_classes, len(x))
        z = patchify(x, self.config.patch_size)
        logdet = 0.0
        for block in self.blocks:
            z, ld = block(z, y)
            logdet = logdet + ld
        return z, logdet

    def loss(self, x, y=None):
        """The per-dimension training loss 0.5 mean(z^2) - mean(logdet) (SPEC)."""
        z, logdet = self(x, y)
        return flow_loss(wide(z), logdet)


@torch.no_grad()
def randomize_(model: TarFlow, seed: int = 0, out_scale: float = 0.3):
    """Draw every parameter away from the initialisation (which is the identity map, since
    proj_out starts at zero), for tests, notebooks and benchmarks of untrained models.

    Linear weights ~ N(0, 1/fan_in), embeddings and biases ~ N(0, 0.1^2), layer-norm gains
    ~ 1 + N(0, 0.1^2); proj_out ~ N(0, out_scale^2 / C), so |a| stays moderate and the inverse
    stays well conditioned. Returns the model.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(p, std, mean=0.0):
        p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * std + mean).to(p.dtype))

    for name, p in model.named_parameters():
        if name.endswith("proj_out.weight"):
            draw(p, out_scale / p.shape[1] ** 0.5)
        elif name.endswith("norm.weight"):
            draw(p, 0.1, 1.0)
        elif name.endswith("weight") and p.ndim == 2:
            draw(p, 1.0 / p.shape[1] ** 0.5)
        else:
            draw(p, 0.1)
    return model
