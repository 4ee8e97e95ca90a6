"""The five released checkpoints (book/checkpoints.md, "Files and names", "State-dict keys and shapes"):
their layout, configuration and size.

For each released file name, a state dict in the released layout (keys and shapes written out
below from the book's tables, independently of the model code) is saved with torch.save under that
name and loaded through load_checkpoint, which must infer the configuration from the tensors and
sigma from the name, and build exactly

    N * [ T C  +  K C  +  (D C + C)  +  (2D C + 2D)  +  L (12 C^2 + 13 C) ]     parameters
          pos    class   proj_in        proj_out       layers: norms, qkv, proj, MLP

(~0.46 G for C = 768, ~0.82 G for C = 1024). One full-size model with random float32 weights
runs a batch-1 forward in NumPy float32 and torch float32, which must agree.

The `fullsize` tests allocate GBs; run them alone: flock /tmp/fullsize.lock pytest -m fullsize.
"""
import gc
import math

import numpy as np
import pytest
import torch

from tarflow_ref import TarFlow, TarFlowConfig, load_checkpoint, model as np_model, to_numpy
from tarflow_ref.config import ConfigError, sigma_from_name
from tarflow_ref.patchify import patchify
from tarflow_ref.registry import RELEASED_FILES

PUBLISHED_TABLE = {  # file: (image size, patch P, width C, classes, sigma); all: 8 blocks of 8 layers, RGB, d = 64
    "afhq_model_8_768_8_8_0.07.pth": (256, 8, 768, 3, 0.07),
    "imagenet_model_4_1024_8_8_0.15.pth": (128, 4, 1024, 1000, 0.15),
    "imagenet64_model_2_768_8_8_0.05.pth": (64, 2, 768, 0, 0.05),
    "imagenet_model_2_768_8_8_0.05.pth": (64, 2, 768, 1000, 0.05),
    "imagenet_model_4_1024_8_8_0.05.pth": (64, 4, 1024, 1000, 0.05),
}
FORWARD_FILE = "imagenet_model_4_1024_8_8_0.05.pth"     # T = 256: the cheapest full-size forward


def published_config(name):
    S, P, C, K, sigma = PUBLISHED_TABLE[name]
    return TarFlowConfig(image_size=S, patch_size=P, channels=3, width=C, blocks=8, layers=8,
                         num_classes=K, head_dim=64, noise_std=sigma)


def released_layout(cfg) -> dict:
    """Every key of a released state dict and its shape, as the book's table lists them."""
    T, C, D, K = cfg.tokens, cfg.width, cfg.token_dim, cfg.num_classes
    layout = {"var": (T, D)}
    for b in range(cfg.blocks):
        p = f"blocks.{b}."
        layout[p + "pos_embed"] = (T, C)
        if K:
            layout[p + "class_embed"] = (K, 1, C)
        layout[p + "attn_mask"] = (T, T)
        layout.update({p + "proj_in.weight": (C, D), p + "proj_in.bias": (C,),
                       p + "proj_out.weight": (2 * D, C), p + "proj_out.bias": (2 * D,)})
        for l in range(cfg.layers):
            q = f"{p}attn_blocks.{l}."
            for norm in ("attention.norm", "mlp.norm"):
                layout.update({f"{q}{norm}.weight": (C,), f"{q}{norm}.bias": (C,)})
            layout.update({q + "attention.qkv.weight": (3 * C, C), q + "attention.qkv.bias": (3 * C,),
                           q + "attention.proj.weight": (C, C), q + "attention.proj.bias": (C,),
                           q + "mlp.main.0.weight": (4 * C, C), q + "mlp.main.0.bias": (4 * C,),
                           q + "mlp.main.2.weight": (C, 4 * C), q + "mlp.main.2.bias": (C,)})
    return layout


def parameter_count(cfg) -> int:
    """The closed form of the module docstring (buffers var and attn_mask are not parameters)."""
    T, C, D, K, L = cfg.tokens, cfg.width, cfg.token_dim, cfg.num_classes, cfg.layers
    return cfg.blocks * (T * C + K * C + (D * C + C) + (2 * D * C + 2 * D) + L * (12 * C * C + 13 * C))


def meta_model(cfg):
    with torch.device("meta"):
        return TarFlow(cfg)


# ---- cheap: configurations and shapes only -----------------------------------------------------------

def test_released_names_give_the_published_configurations():
    assert set(RELEASED_FILES) == set(PUBLISHED_TABLE)
    for name in PUBLISHED_TABLE:
        cfg = TarFlowConfig.from_release_name(name)
        assert cfg == published_config(name)
        assert sigma_from_name(f"/some/dir/{name}") == PUBLISHED_TABLE[name][4]
        assert cfg.file_name(name.split("_model_")[0]) == name
    a, b = (TarFlowConfig.from_release_name(f"imagenet_model_4_1024_8_8_{s}.pth") for s in ("0.15", "0.05"))
    assert (a.image_size, b.image_size) == (128, 64)
    assert a.replace(image_size=64, noise_std=0.05) == b           # the name alone cannot tell them apart


def test_unknown_names_and_impossible_configurations():
    with pytest.raises(ConfigError, match="unknown released file 'imagenet_model_4_1024_8_8_0.10.pth'; known: afhq"):
        TarFlowConfig.from_release_name("imagenet_model_4_1024_8_8_0.10.pth")
    assert sigma_from_name("weights.pth") is None
    with pytest.raises(ConfigError, match="image size 10 is not divisible by patch size 4"):
        TarFlowConfig(image_size=10, patch_size=4)
    with pytest.raises(ConfigError, match="width 100 is not divisible by head width 64"):
        TarFlowConfig(image_size=8, patch_size=2, width=100)
    with pytest.raises(ConfigError, match="layers must be positive, got 0"):
        TarFlowConfig(image_size=8, patch_size=2, layers=0)
    with pytest.raises(ConfigError, match="num_classes must be >= 0, got -1"):
        TarFlowConfig(image_size=8, patch_size=2, num_classes=-1)


@pytest.mark.parametrize("name", list(PUBLISHED_TABLE))
def test_model_has_the_released_layout_and_parameter_count(name):
    cfg = published_config(name)
    model = meta_model(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == released_layout(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert count == parameter_count(cfg)
    assert count / 1e9 == pytest.approx(0.46 if cfg.width == 768 else 0.82, abs=0.01)


# ---- full size: models of 1.8-3.3 GB ---------------------------------------------------------------

def shared_zero_state(cfg) -> dict:
    """The released keys, shapes and dtype, filled with zeros (and the causal masks and prior
    variance of the released files). Every tensor is a view of ONE zero buffer (every mask of one mask), so
    torch.save writes ~20 MB instead of 1.8-3.3 GB; the loader reads such a file the same way."""
    layout = released_layout(cfg)
    zeros = torch.zeros(max(math.prod(shape) for shape in layout.values()))
    mask = torch.tril(torch.ones(cfg.tokens, cfg.tokens))
    state = {k: mask if k.endswith("attn_mask") else zeros[:math.prod(shape)].view(shape)
             for k, shape in layout.items()}
    state["var"] = torch.ones(cfg.tokens, cfg.token_dim)
    return state


def random_state(cfg, seed=0, out_scale=0.1) -> dict:
    """A released-size state dict of separate float32 tensors (3.3 GB for C = 1024), away from the
    identity initialisation, fast: each tensor is a window, at a random offset, of one seeded pool
    of N(0, 1) draws, scaled as torch_backend.model.randomize_ does (0.8 G fresh normal draws
    would take several seconds more). out_scale 0.1 keeps z finite through 8 blocks of 8 layers."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(2 ** 23, generator=gen)
    state = {}
    for k, shape in released_layout(cfg).items():
        n = math.prod(shape)
        start = int(torch.randint(0, pool.numel() - n + 1, (), generator=gen))
        draw = pool[start:start + n].view(shape)
        if k.endswith("attn_mask"):
            state[k] = torch.tril(torch.ones(shape))
        elif k == "var":
            state[k] = torch.ones(shape)
        elif k.endswith("proj_out.weight"):
            state[k] = draw * (out_scale / shape[1] ** 0.5)
        elif k.endswith("norm.weight"):
            state[k] = 1 + 0.1 * draw
        elif k.endswith("weight"):
            state[k] = draw / shape[1] ** 0.5
        else:
            state[k] = 0.1 * draw
    return state


def save_and_load(state, path):
    """torch.save under the released name, then load_checkpoint; the file is removed at once."""
    torch.save(state, path)
    state.clear()
    try:
        return load_checkpoint(path)
    finally:
        path.unlink()
        gc.collect()


@pytest.mark.fullsize
@pytest.mark.parametrize("name", list(PUBLISHED_TABLE))
def test_released_checkpoint_loads_with_the_inferred_configuration(name, tmp_path):
    cfg = published_config(name)
    model = save_and_load(shared_zero_state(cfg), tmp_path / name)
    assert model.config == cfg                            # image size from the tensors, sigma from the name
    assert sum(p.numel() for p in model.parameters()) == parameter_count(cfg)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.blocks[7].attn_mask, torch.tril(torch.ones(cfg.tokens, cfg.tokens)))
    assert model.blocks[3].attn_blocks[5].mlp.main[0].weight.abs().max() == 0    # the file's values, not an init
    del model
    gc.collect()


@pytest.mark.fullsize
def test_fullsize_forward_numpy_float32_equals_torch_float32(tmp_path):
    cfg = published_config(FORWARD_FILE)
    model = save_and_load(random_state(cfg), tmp_path / FORWARD_FILE)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    y = torch.tensor([417])
    with torch.no_grad():
        z, logdet = model(x, y)
    params = to_numpy(model, dtype=np.float32)
    del model
    gc.collect()
    np_z, np_logdet = np_model.forward(params, cfg, x.numpy(), y.numpy())
    assert np_z.dtype == np.float32 and np_logdet.dtype == np.float32
    assert np.isfinite(np_z).all()
    assert np.abs(np_z - patchify(x.numpy(), cfg.patch_size)).max() > 0.1    # far from the identity
    assert abs(np_logdet[0]) > 1e-2
    assert np.abs(np_z - z.numpy()).max() / np.abs(np_z).max() < 1e-4
    assert abs(np_logdet[0] - logdet[0].item()) / abs(np_logdet[0]) < 1e-4
