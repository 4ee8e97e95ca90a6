"""NumPy parameters without torch (tarflow_ref/params.py): the released keys, shapes and order of the
torch model's state dict; the recipe's initialisation is the identity flow; weights drawn away from
it follow the same rule as torch_backend.model.randomize_, and make an invertible, non-trivial flow."""
import numpy as np
import pytest

from tarflow_ref import TarFlow, TarFlowConfig, model as np_model
from tarflow_ref.params import BUFFERS, away_from_init, init_params, random_params, randomize, shapes
from tarflow_ref.patchify import patchify
from tarflow_ref.torch_backend.model import randomize_

from conftest import SMALL_CONFIGS


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_keys_shapes_and_order_are_the_torch_state_dict(name):
    cfg = SMALL_CONFIGS[name]
    state = TarFlow(cfg).state_dict()
    assert list(shapes(cfg).items()) == [(k, tuple(v.shape)) for k, v in state.items()]
    params = init_params(cfg)
    assert list(params) == list(state) and all(params[k].shape == state[k].shape for k in state)
    assert np.array_equal(params["blocks.0.attn_mask"], state["blocks.0.attn_mask"].numpy())
    assert np.array_equal(params["var"], state["var"].numpy())


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_the_initialisation_is_the_identity_flow(name, rng):
    cfg = SMALL_CONFIGS[name]
    params = init_params(cfg, seed=2)
    x = rng.uniform(-1, 1, size=(2, cfg.channels, cfg.image_size, cfg.image_size))
    y = np.array([0, -1]) if cfg.conditional else None
    z, logdet = np_model.forward(params, cfg, x, y)
    assert np.array_equal(z, patchify(x, cfg.patch_size)) and np.array_equal(logdet, np.zeros(2))
    fan_in = cfg.width
    qkv = params["blocks.0.attn_blocks.0.attention.qkv.weight"]
    assert np.abs(qkv).max() <= 1 / np.sqrt(fan_in) and qkv.std() > 0.4 / np.sqrt(fan_in)   # U(+-1/sqrt(fan_in))


def test_numpy_and_torch_draw_away_from_init_by_one_rule():
    """Per trained parameter, the mean and spread of the NumPy and the torch draw agree with each
    other and with away_from_init; the buffers are left alone."""
    cfg = TarFlowConfig(image_size=8, patch_size=1, channels=1, width=64, blocks=1, layers=1, num_classes=10,
                        head_dim=16)
    state = randomize_(TarFlow(cfg).double(), seed=3, out_scale=0.3).state_dict()
    params = random_params(cfg, seed=3, out_scale=0.3)
    for key, value in params.items():
        if key.split(".")[-1] in BUFFERS:
            assert np.array_equal(value, state[key].numpy())
            continue
        mean, std = away_from_init(key, value.shape, 0.3)
        for draw in (value, state[key].numpy()):
            tolerance = 4 * std / np.sqrt(draw.size)                       # four standard errors
            assert abs(draw.mean() - mean) < tolerance, key
            if draw.size >= 64:
                assert abs(draw.std() / std - 1) < 4 / np.sqrt(draw.size) + 0.02, key


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_random_params_make_an_invertible_flow_far_from_the_identity(name, rng):
    cfg = SMALL_CONFIGS[name]
    params = randomize(init_params(cfg), seed=4, out_scale=0.2)
    x = rng.uniform(-1, 1, size=(3, cfg.channels, cfg.image_size, cfg.image_size))
    z, logdet = np_model.forward(params, cfg, x)
    tokens = patchify(x, cfg.patch_size)
    assert np.abs(z - tokens).max() > 0.1 and np.abs(logdet).min() > 1e-3
    np.testing.assert_allclose(np_model.inverse(params, cfg, z), tokens, rtol=0, atol=1e-9)
