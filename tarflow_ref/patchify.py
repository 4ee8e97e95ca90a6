"""Patchify: an image becomes a sequence of tokens (book/checkpoints.md, "Patches and token order";
Zhai et al. 2024, Sec. 2.3).

The image x: [B, c, S, S] is cut into P x P patches, read in raster order over the patch grid
(row by row). Each patch becomes one token of D = c * P^2 values, ordered channel first, then
patch row, then patch column:

    tokens[b, t, c*P^2 + i*P + j] = x[b, c, r*P + i, q*P + j],   t = r * (S/P) + q

This is `torch.nn.functional.unfold(x, P, stride=P).transpose(1, 2)`; `unpatchify` inverts it.
The einops patterns below work on NumPy arrays and torch tensors alike, so both backends
share this one module.
"""
from einops import rearrange


def patchify(x, patch_size: int):
    """x: [B, c, S, S] -> tokens [B, T, D] with T = (S/P)^2, D = c*P^2."""
    if x.ndim != 4:
        raise ValueError(f"expected an image batch [B, c, S, S], got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {patch_size}")
    return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=patch_size, q=patch_size)


def unpatchify(tokens, patch_size: int, channels: int):
    """tokens: [B, T, D] -> image [B, c, S, S] with S = sqrt(T) * P."""
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens [B, T, D], got shape {tuple(tokens.shape)}")
    T, D = tokens.shape[1:]
    grid = int(round(T ** 0.5))
    if grid * grid != T or D != channels * patch_size ** 2:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not form a square image "
                         f"with patch {patch_size} and {channels} channels")
    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=grid, p=patch_size, q=patch_size)
