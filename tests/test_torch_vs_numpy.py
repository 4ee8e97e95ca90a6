"""The torch backend equals the float64 NumPy reference (book/checkpoints.md), on random small
configurations with weights away from the initialisation: conditional and unconditional, odd and
even block counts, patch sizes 1, 2 and 4, RGB and grayscale.

    forward z and log-det:            relative error < 1e-10
    sequential samples (+ guidance):  relative error < 1e-9

Also: the parameter conversion to_numpy / from_numpy is exact and strict, and both backends reject
bad input with the same clear messages.
"""
import numpy as np
import pytest
import torch

from tarflow_ref import CheckpointError, Guidance, from_numpy, model as np_model, sample, to_numpy
from tarflow_ref.logdet import loss

from conftest import SMALL_CONFIGS, make_model

GUIDANCE = {
    "none": None,
    "a": Guidance(1.2, "a"),
    "b": Guidance(0.7, "b"),
    "ab-annealed": Guidance(2.0, "ab", annealed=True),
    "ab-tau": Guidance(1.0, "ab", temperature=0.5),
}


def rel_err(got, want):
    got = got.numpy() if isinstance(got, torch.Tensor) else got
    return np.abs(got - want).max() / np.abs(want).max()


def labels(cfg, kind, batch=3):
    """'mixed': real labels and a negative one ('no label'); 'none': y = None. NumPy and torch twins."""
    if kind == "none":
        return None, None
    y = np.array([cfg.num_classes - 1, -1, 0][:batch]) if cfg.conditional else -np.ones(batch, dtype=np.int64)
    return y, torch.from_numpy(y)


@pytest.mark.parametrize("kind", ["mixed", "none"])
def test_forward_agrees(small, kind, rng):
    _, cfg, model, params = small
    x = rng.uniform(-1, 1, size=(3, cfg.channels, cfg.image_size, cfg.image_size))
    y, ty = labels(cfg, kind)
    z, logdet = np_model.forward(params, cfg, x, y)
    with torch.no_grad():
        tz, tlogdet = model(torch.from_numpy(x), ty)
        tloss = model.loss(torch.from_numpy(x), ty)
    assert rel_err(tz, z) < 1e-10
    assert rel_err(tlogdet, logdet) < 1e-10
    assert np.abs(logdet).min() > 1e-3                                # a non-trivial flow
    assert tloss.item() == pytest.approx(loss(z, logdet), rel=1e-10)


@pytest.mark.parametrize("guidance", list(GUIDANCE), ids=list(GUIDANCE))
@pytest.mark.parametrize("kind", ["mixed", "none"])
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_sampling_agrees(name, guidance, kind, rng):
    cfg = SMALL_CONFIGS[name]
    # a smaller proj_out keeps the inverse of N(0, I) noise finite (|x| < 10) through every block
    model, params = make_model(cfg, seed=len(name), out_scale=0.15)
    g = GUIDANCE[guidance]
    noise = rng.normal(size=(3, cfg.tokens, cfg.token_dim))
    y, ty = labels(cfg, kind)
    want = np_model.sample(params, cfg, noise, y, g)
    got = sample(model, torch.from_numpy(noise), ty, g)
    assert got.shape == (3, cfg.channels, cfg.image_size, cfg.image_size)
    assert rel_err(got, want) < 1e-9
    branches_differ = y is not None and (y >= 0).any() or g is not None and g.temperature != 1
    if g is not None and branches_differ:                                # guidance really acted
        assert np.abs(want - np_model.sample(params, cfg, noise, y)).max() > 1e-3


def test_to_numpy_from_numpy_round_trip_is_exact(small):
    _, cfg, model, params = small
    state = model.state_dict()
    assert list(params) == list(state)
    assert all(p.dtype == np.float64 and np.array_equal(p, state[k].numpy()) for k, p in params.items())
    back = from_numpy(params, cfg).state_dict()
    assert all(torch.equal(back[k], v) and back[k].dtype == torch.float64 for k, v in state.items())
    again = to_numpy(back)                                               # a state dict works too
    assert all(np.array_equal(again[k], p) for k, p in params.items())
    params["var"][0, 0] = 7.0                                            # a copy: the model is untouched
    assert model.var[0, 0] == 1.0
    params32 = to_numpy(model.float(), dtype=np.float32)
    assert all(p.dtype == np.float32 for p in params32.values())
    back32 = from_numpy(params32, cfg, dtype=torch.float32).state_dict()
    assert all(torch.equal(back32[k], torch.from_numpy(p)) for k, p in params32.items())
    params16 = to_numpy(model.bfloat16())                                # NumPy has no bfloat16: widened exactly
    assert all(np.array_equal(params16[k], v.double().numpy()) for k, v in model.state_dict().items())


def test_numpy_float32_stays_float32(small, rng):
    _, cfg, model, _ = small
    params = to_numpy(model, dtype=np.float32)
    x = rng.uniform(-1, 1, size=(2, cfg.channels, cfg.image_size, cfg.image_size)).astype(np.float32)
    z, logdet = np_model.forward(params, cfg, x, labels(cfg, "mixed", 2)[0])
    assert z.dtype == np.float32 and logdet.dtype == np.float32
    with torch.no_grad():
        tz, _ = model.float()(torch.from_numpy(x), labels(cfg, "mixed", 2)[1])
    assert rel_err(tz, z) < 1e-5


def test_from_numpy_is_strict():
    cfg = SMALL_CONFIGS["cond-even-P2"]
    _, params = make_model(cfg)
    key = "blocks.1.attn_blocks.0.mlp.main.0.weight"
    with pytest.raises(CheckpointError, match=rf"missing key '{key}' \(expected shape \[128, 32\]\)"):
        from_numpy({k: v for k, v in params.items() if k != key}, cfg)
    with pytest.raises(CheckpointError, match=r"unexpected key 'blocks.0.extra' \(shape \[2\]\)"):
        from_numpy(dict(params, **{"blocks.0.extra": np.zeros(2)}), cfg)
    with pytest.raises(CheckpointError, match=rf"key '{key}' has shape \[128, 31\], expected \[128, 32\]"):
        from_numpy(dict(params, **{key: params[key][:, :31]}), cfg)
    with pytest.raises(CheckpointError, match="missing key 'blocks.2.pos_embed'"):
        from_numpy(params, cfg.replace(blocks=3))


# ---- bad input, both backends ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def cond():
    cfg = SMALL_CONFIGS["cond-even-P2"]                                  # 8x8 RGB, P = 2, 4 classes
    return (cfg, *make_model(cfg))


def test_image_not_divisible_by_the_patch(cond):
    cfg, model, params = cond
    x = np.zeros((1, 3, 7, 7))
    message = r"expected images \[B, 3, 8, 8\], got \(1, 3, 7, 7\) \(size 7 is not divisible by the patch 2\)"
    with pytest.raises(ValueError, match=message):
        np_model.forward(params, cfg, x)
    with pytest.raises(ValueError, match=message):
        model(torch.from_numpy(x))


def test_label_out_of_range(cond):
    cfg, model, params = cond
    x = np.zeros((2, 3, 8, 8))
    noise = np.zeros((2, cfg.tokens, cfg.token_dim))
    y = np.array([0, 4])
    message = r"label 4 is out of range: labels must be < 4"
    for call in (lambda: np_model.forward(params, cfg, x, y), lambda: model(torch.from_numpy(x), torch.from_numpy(y)),
                 lambda: np_model.sample(params, cfg, noise, y),
                 lambda: sample(model, torch.from_numpy(noise), torch.from_numpy(y))):
        with pytest.raises(ValueError, match=message):
            call()


def test_label_for_an_unconditional_model():
    cfg = SMALL_CONFIGS["uncond-odd-P4"]
    model, params = make_model(cfg)
    x, y = np.zeros((2, 3, 8, 8)), np.array([-1, 0])
    message = "label 0 is out of range: this model is unconditional, so only labels < 0 are allowed"
    with pytest.raises(ValueError, match=message):
        np_model.forward(params, cfg, x, y)
    with pytest.raises(ValueError, match=message):
        model(torch.from_numpy(x), torch.from_numpy(y))


def test_wrong_z_shape_for_sampling(cond):
    cfg, model, params = cond
    message = r"expected noise of shape \[B, 16, 12\] \(T tokens, D values\), got \(2, 16, 13\)"
    with pytest.raises(ValueError, match=message):
        np_model.sample(params, cfg, np.zeros((2, 16, 13)))
    with pytest.raises(ValueError, match=message):
        sample(model, torch.zeros(2, 16, 13, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"got \(16, 12\)"):
        sample(model, torch.zeros(16, 12, dtype=torch.float64))
