"""TarFlow as a torch nn.Module whose state_dict() has exactly the released keys and shapes
(book/checkpoints.md, "State-dict keys and shapes"; params.py lists them).

Each piece mirrors the NumPy reference, same names and equations, proven equal by
tests/test_torch_vs_numpy.py:

    Attention.forward        attention.causal_attention      (queries, keys, values; causal mask)
    MLP, AttentionBlock      attention.mlp, transformer_layer
    MetaBlock.permute / class_embedding / conditioner / forward
                             flow.permute / class_embedding / conditioner / block_forward
    shift                    flow.shift
    TarFlow.forward, loss    model.forward, logdet.loss

Fast sampling (static caches, device positions, both guidance branches in one batch, CUDA graphs)
is engine.py's; it uses these modules' weights and layers.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import TarFlowConfig
from ..flow import reverses
from ..logdet import loss as flow_loss
from ..params import away_from_init
from ..patchify import patchify
from ..validation import check_image, check_labels
from .checks import tensors_of
from .precision import wide


class Attention(nn.Module):
    """Pre-norm causal multi-head attention; attention.py has the math."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def queries_keys_values(self, h):
        """q, k, v: [B, H, n, d] from h: [B, n, C] (layer norm, then the qkv layer split by heads)."""
        return rearrange(self.qkv(self.norm(h)), "b n (three h d) -> three b h n d", three=3, h=self.heads)

    def output(self, o):
        """The heads' outputs o: [B, H, n, d] concatenated and projected: [B, n, C]."""
        return self.proj(rearrange(o, "b h n d -> b n (h d)"))

    def forward(self, h, start=0, cache=None, temperature=1.0):
        """h: [B, n, C] at positions start..start+n-1 -> [B, n, C]; a cache holds the earlier tokens."""
        q, k, v = self.queries_keys_values(h)
        if cache is not None:
            k, v = cache.write(k, v, start)
        elif start != 0:
            raise ValueError("attention at a later position needs the cache of the earlier tokens")
        n, keys = q.shape[2], k.shape[2]
        # query i (position start + i) sees keys 0..start+i; one query at the end sees every key
        allowed = None if n == 1 else \
            torch.arange(keys, device=h.device) <= start + torch.arange(n, device=h.device)[:, None]
        scale = 1.0 / (q.shape[-1] ** 0.5 * temperature)
        return self.output(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale))


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

    def forward(self, h, start=0, cache=None, temperature=1.0):
        h = h + self.attention(h, start, cache, temperature)
        return h + self.mlp(h)


def shift(o):
    """o'_t = o_{t-1}, o'_0 = 0 along the token axis of o: [B, T, D]."""
    return F.pad(o[:, :-1], (0, 0, 1, 0))


class MetaBlock(nn.Module):
    """One affine autoregressive flow block (flow.py)."""

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
        pos = self.permute(self.pos_embed, dim=0)[start:start + n]
        h = self.proj_in(u) + pos + self.class_embedding(y, u.shape[0])
        for l, layer in enumerate(self.attn_blocks):
            h = layer(h, start, None if caches is None else caches[l], temperature)
        o = self.proj_out(h)
        return o[..., :self.token_dim], o[..., self.token_dim:]

    def forward(self, x, y=None):
        """x: [B, T, D] (image order) -> z: [B, T, D], logdet: [B] (the mean over T*D)."""
        u = self.permute(x)
        a, m = self.conditioner(u, y)
        a, m = wide(shift(a)), shift(m)
        z = (u - m) * torch.exp(-a)
        return self.permute(z), -a.mean(dim=(1, 2))


class TarFlow(nn.Module):
    """The whole flow. forward: image [B, c, S, S] -> z [B, T, D], logdet [B]."""

    def __init__(self, cfg: TarFlowConfig):
        super().__init__()
        self.config = cfg
        self.register_buffer("var", torch.ones(cfg.tokens, cfg.token_dim))
        self.blocks = nn.ModuleList(MetaBlock(cfg, reverse=reverses(b)) for b in range(cfg.blocks))

    def forward(self, x, y=None):
        tensors = tensors_of(self)
        check_image(x, self.config, tensors)
        check_labels(y, self.config.num_classes, len(x), tensors)
        z = patchify(x, self.config.patch_size)
        logdet = 0.0
        for block in self.blocks:
            z, ld = block(z, y)
            logdet = logdet + ld
        return z, logdet

    def loss(self, x, y=None):
        """The per-dimension training loss 0.5 mean(z^2) - mean(logdet) (logdet.loss)."""
        z, logdet = self(x, y)
        return flow_loss(wide(z), logdet)


@torch.no_grad()
def randomize_(model: TarFlow, seed: int = 0, out_scale: float = 0.3):
    """Draw every parameter away from the initialisation (which is the identity map, since proj_out
    starts at zero) by params.away_from_init, with torch's generator; returns the model. For tests,
    notebooks and benchmarks of untrained models."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        mean, std = away_from_init(name, p.shape, out_scale)
        p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * std + mean).to(p.dtype))
    return model
