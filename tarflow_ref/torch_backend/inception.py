"""The FID variant of Inception v3: the network inside the released FID statistics files
(book/checkpoints.md, "FID statistics files"; Szegedy et al. 2016 for Inception v3, Heusel et al.
2017 for its use in FID).

It is the 2015-12-05 TensorFlow graph that FID was defined with, not torchvision's Inception v3:

* 1008 logits (`fc`), which FID does not use: the features are the 2048 values after the final
  global average pool. `fc` is kept so that the state dict equals the files' `inception.*` entries.
* every convolution has no bias and is followed by batch norm (eps = 0.001, running statistics)
  and ReLU: `ConvBN`, keys `{name}.conv.weight`, `{name}.bn.{weight,bias,running_mean,running_var,
  num_batches_tracked}`: 94 of them, plus `fc.weight` [1008, 2048] and `fc.bias` = 566 entries.
* the pooling branches of the 35x35 (Mixed_5b-d) and 17x17 (Mixed_6b-e) blocks and of Mixed_7b
  average over the 3x3 window with the zero padding NOT counted (count_include_pad=False);
  Mixed_7c's pooling branch takes the maximum.

Input: uint8 images [B, 3, H, W] (grey [B, 1, H, W] is repeated to RGB), any size, resized to
299 x 299 by TensorFlow 1's bilinear rule (`resize_tf1`), then x -> (x - 128) / 128, in float32.

    stem      299 -> Conv2d_1a_3x3 (s2) 149 -> 2a 147 -> 2b 147 -> max pool (s2) 73 -> 3b 73 -> 4a 71
              -> max pool (s2) 35                                                  [B, 192, 35, 35]
    Mixed_5b, 5c, 5d   (Grid35, 4 branches)                                         [B, 288, 35, 35]
    Mixed_6a           (Reduce35: stride-2 convolutions and max pool)               [B, 768, 17, 17]
    Mixed_6b .. 6e     (Grid17, factorised 1x7 / 7x1 convolutions)                 [B, 768, 17, 17]
    Mixed_7a           (Reduce17)                                                  [B, 1280, 8, 8]
    Mixed_7b, 7c       (Grid8, split 1x3 / 3x1 branches)                           [B, 2048, 8, 8]
    mean over the 8 x 8 positions                                                  [B, 2048]
"""
import torch
import torch.nn.functional as F
from torch import nn

SIZE = 299
FEATURES = 2048
LOGITS = 1008


def resize_tf1(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """TensorFlow 1 `resize_bilinear` (align_corners=False, no half-pixel centres, no antialiasing).

    Output index i reads the input at s = i * (H_in / H_out): rows floor(s) and min(floor(s) + 1,
    H_in - 1) mixed with weight s - floor(s); columns likewise, columns first, then rows:

        top = x[r0, c0] + (x[r0, c1] - x[r0, c0]) * wc,   bottom likewise on r1,
        out = top + (bottom - top) * wr

    Unlike torch's interpolate (half-pixel centres), output pixel 0 sits exactly on input pixel 0
    and the last output pixels read past the image's end, clamped. x: [B, C, H, W] float -> [B, C, size, size].
    """
    H, W = x.shape[-2:]
    r0, r1, wr = _source_positions(H, size, x.dtype, x.device)
    c0, c1, wc = _source_positions(W, size, x.dtype, x.device)
    left, right = x[..., c0], x[..., c1]                              # [B, C, H, size]
    x = left + (right - left) * wc
    top, bottom = x[..., r0, :], x[..., r1, :]                        # [B, C, size, size]
    return top + (bottom - top) * wr[:, None]


def _source_positions(n_in: int, n_out: int, dtype, device):
    """(lower index, upper index, weight of the upper) for each output position, [n_out] each."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)          # TF1 computes the scale and s in float32
    s = torch.arange(n_out, dtype=torch.float32) * scale
    lower = s.floor().long()
    upper = (lower + 1).clamp(max=n_in - 1)
    return lower.to(device), upper.to(device), (s - lower).to(dtype=dtype, device=device)


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 0.001, running statistics), ReLU."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):
    """3x3 average, stride 1, the zero padding not counted (an edge pixel averages 4 or 6 values)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class Grid35(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1  (64 + 64 + 96 + pool)."""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_3x3(x))], dim=1)


class Reduce35(nn.Module):
    """Mixed_6a, 35 -> 17: 3x3 (s2) | 1x1 -> 3x3 -> 3x3 (s2) | 3x3 max pool (s2)  (384 + 96 + 288)."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class Grid17(nn.Module):
    """Mixed_6b..6e: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg pool -> 1x1 (4 x 192)."""

    def __init__(self, c_in, c7):
        super().__init__()
        row, col = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            double = conv(double)
        return torch.cat([self.branch1x1(x), seven, double, self.branch_pool(avg_pool_3x3(x))], dim=1)


class Reduce17(nn.Module):
    """Mixed_7a, 17 -> 8: 1x1 -> 3x3 (s2) | 1x1 -> 1x7 -> 7x1 -> 3x3 (s2) | 3x3 max pool (s2) (320 + 192 + 768)."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], dim=1)


class Grid8(nn.Module):
    """Mixed_7b/7c: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1  (320 + 768 + 768 + 192).

    The pool is the padding-excluding 3x3 average in Mixed_7b and the 3x3 maximum in Mixed_7c."""

    def __init__(self, c_in, max_pool: bool):
        super().__init__()
        row, col = {"kernel": (1, 3), "padding": (0, 1)}, {"kernel": (3, 1), "padding": (1, 0)}
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, **row)
        self.branch3x3_2b = ConvBN(384, 384, **col)
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, **row)
        self.branch3x3dbl_3b = ConvBN(384, 384, **col)
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(pooled)], dim=1)


class InceptionV3(nn.Module):
    """uint8 images [B, 3 or 1, H, W] -> the 2048 FID features [B, 2048] float32 (module docstring).

    Load the weights of a released statistics file with `tarflow_ref.evaluation.fid.read_stats_file`.
    """
    prefix = "inception"        # the key prefix of this network in a statistics file
    channels = 3
    features = FEATURES

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = Grid35(192, pool_features=32)
        self.Mixed_5c = Grid35(256, pool_features=64)
        self.Mixed_5d = Grid35(288, pool_features=64)
        self.Mixed_6a = Reduce35(288)
        self.Mixed_6b = Grid17(768, c7=128)
        self.Mixed_6c = Grid17(768, c7=160)
        self.Mixed_6d = Grid17(768, c7=160)
        self.Mixed_6e = Grid17(768, c7=192)
        self.Mixed_7a = Reduce17(768)
        self.Mixed_7b = Grid8(1280, max_pool=False)
        self.Mixed_7c = Grid8(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, LOGITS)        # the graph's classifier: in the files, unused by FID

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes uint8 images [B, 3, H, W] (or grey [B, 1, H, W]); got "
                             f"{images.dtype} {list(images.shape)}")
        x = images.expand(-1, 3, -1, -1).float()                       # grey -> RGB
        x = (resize_tf1(x) - 128) / 128                                # [B, 3, 299, 299]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)                               # [B, 64, 73, 73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)                               # [B, 192, 35, 35]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)                                               # ... [B, 2048, 8, 8]
        return x.mean(dim=(2, 3))                                      # [B, 2048]


@torch.no_grad()
def randomize_(net: InceptionV3, seed: int = 0) -> InceptionV3:
    """Random weights for tests and benchmarks (the real ones exist only inside the released files).

    Convolutions ~ N(0, 2 / fan_in) (He: ReLU keeps the activations' scale through the 17 layers
    of the deepest path), batch-norm gains ~ 1 + N(0, 0.1^2), shifts and running means
    ~ N(0, 0.1^2), running variances ~ U(0.5, 2), fc ~ N(0, 1 / 2048): no layer is an identity
    and no statistic is the initial 0 / 1. Returns the network.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, t in net.state_dict().items():
        if name.endswith("num_batches_tracked"):
            t.fill_(int(torch.randint(1, 10_000, (), generator=gen)))
            continue
        if name.endswith("conv.weight") or name == "fc.weight":
            std = (2.0 if name.endswith("conv.weight") else 1.0) / t[0].numel()
            new = torch.randn(t.shape, generator=gen) * std ** 0.5
        elif name.endswith("running_var"):
            new = torch.rand(t.shape, generator=gen) * 1.5 + 0.5
        else:
            new = torch.randn(t.shape, generator=gen) * 0.1 + (1.0 if name.endswith("bn.weight") else 0.0)
        t.copy_(new)
    return net
