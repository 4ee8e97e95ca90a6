"""Patchify (book/checkpoints.md, "Patches and token order"): tokens are P x P patches in raster
order, values ordered c*P^2 + i*P + j, exactly torch's unfold transposed; unpatchify (and torch's fold) invert it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tarflow_ref.patchify import patchify, unpatchify

SHAPES = [(2, 3, 8, 2), (1, 3, 8, 4), (3, 1, 4, 1), (2, 1, 12, 3), (1, 3, 6, 6)]   # B, c, S, P


@pytest.mark.parametrize("B, c, S, P", SHAPES)
def test_patchify_equals_unfold_transposed(B, c, S, P):
    x = torch.randn(B, c, S, S, generator=torch.Generator().manual_seed(S * P), dtype=torch.float64)
    reference = F.unfold(x, P, stride=P).transpose(1, 2)                 # [B, T, D]
    assert patchify(x, P).shape == (B, (S // P) ** 2, c * P * P)
    assert torch.equal(patchify(x, P), reference)
    assert np.array_equal(patchify(x.numpy(), P), reference.numpy())


@pytest.mark.parametrize("B, c, S, P", SHAPES)
def test_fold_and_unpatchify_invert_patchify(B, c, S, P):
    x = torch.randn(B, c, S, S, generator=torch.Generator().manual_seed(S + P), dtype=torch.float64)
    tokens = patchify(x, P)
    assert torch.equal(F.fold(tokens.transpose(1, 2), (S, S), P, stride=P), x)
    assert torch.equal(unpatchify(tokens, P, c), x)
    assert np.array_equal(unpatchify(patchify(x.numpy(), P), P, c), x.numpy())


def test_value_order_on_an_analytic_image():
    """x[0, c, y, x] = 1000 c + 10 y + x makes every value name its own pixel."""
    c, S, P = 2, 4, 2
    x = np.fromfunction(lambda ch, row, col: 1000 * ch + 10 * row + col, (c, S, S))[None]
    tokens = patchify(x, P)                                              # [1, 4, 8]
    # token 1 is patch row 0, patch column 1: pixels rows 0..1, columns 2..3
    assert tokens[0, 1].tolist() == [2, 3, 12, 13, 1002, 1003, 1012, 1013]
    # token 2 is patch row 1, patch column 0 (raster order over the patch grid)
    assert tokens[0, 2].tolist() == [20, 21, 30, 31, 1020, 1021, 1030, 1031]
    for t in range(4):
        r, q = divmod(t, S // P)
        for ch in range(c):
            for i in range(P):
                for j in range(P):
                    assert tokens[0, t, ch * P * P + i * P + j] == x[0, ch, r * P + i, q * P + j]


def test_size_not_divisible_by_the_patch():
    with pytest.raises(ValueError, match="image size 6x6 is not divisible by the patch size 4"):
        patchify(np.zeros((1, 3, 6, 6)), 4)
    with pytest.raises(ValueError, match="not divisible by the patch size 3"):
        patchify(torch.zeros(1, 3, 8, 8), 3)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"expected an image batch \[B, c, S, S\], got shape \(3, 8, 8\)"):
        patchify(np.zeros((3, 8, 8)), 2)
    with pytest.raises(ValueError, match=r"expected tokens \[B, T, D\], got shape \(5, 12\)"):
        unpatchify(np.zeros((5, 12)), 2, 3)
    with pytest.raises(ValueError, match=r"tokens of shape \(1, 5, 12\) do not form a square image"):
        unpatchify(np.zeros((1, 5, 12)), 2, 3)
    with pytest.raises(ValueError, match=r"tokens of shape \(1, 4, 12\) do not form a square image with patch 2 and 1"):
        unpatchify(np.zeros((1, 4, 12)), 2, 1)
