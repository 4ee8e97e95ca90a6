"""The log-determinant under bfloat16 autocast (torch_backend/model.py, `wide`; book/checkpoints.md,
"One flow block"). The log-scale a comes out of bfloat16 matrix products, but

    logdet = -mean(a)   over the T * D entries of a block,

is taken in float32, as the recipe does: logdet is float32 and equals the float64 mean of the same
bfloat16 a to float32 accuracy (a bfloat16 mean would be off by up to 2^-9 of its value), and the
whole model's logdet stays within bfloat16's error of the float64 model.
"""
import torch
import torch.nn.functional as F

from conftest import SMALL_CONFIGS, make_model

CFG = SMALL_CONFIGS["cond-even-P2"]                      # T = 16 tokens of D = 12 values, 2 blocks


def inputs(dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(8, CFG.channels, CFG.image_size, CFG.image_size, generator=gen, dtype=torch.float64) * 2 - 1
    return x.to(dtype), torch.arange(8) % CFG.num_classes


def test_a_blocks_logdet_is_the_float32_mean_of_its_bfloat16_log_scale():
    model, _ = make_model(CFG, seed=3, dtype=torch.float32, out_scale=1.0)
    block = model.blocks[1]
    _, y = inputs(torch.float32)
    u = torch.randn(8, CFG.tokens, CFG.token_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = block(u, y)
        a, _ = block.conditioner(block.permute(u), y)
    assert a.dtype == torch.bfloat16                                  # autocast really ran
    assert logdet.dtype == torch.float32 and z.dtype == torch.float32
    want = -F.pad(a[:, :-1], (0, 0, 1, 0)).double().mean(dim=(1, 2))  # the shift, then the mean in float64
    assert (logdet.double() - want).abs().max() <= 1e-6 * want.abs().max()


def test_the_models_logdet_under_bfloat16_is_float32_and_close_to_float64():
    model64, _ = make_model(CFG, seed=3, dtype=torch.float64, out_scale=1.0)
    model32, _ = make_model(CFG, seed=3, dtype=torch.float32, out_scale=1.0)
    x, y = inputs(torch.float64)
    with torch.no_grad():
        _, want = model64(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, logdet = model32(x.float(), y)
    assert logdet.dtype == torch.float32
    error = ((logdet.double() - want).abs().max() / want.abs().max()).item()
    assert 1e-4 < error < 0.05, error                                # bfloat16 ran (8 bits), and stayed close
