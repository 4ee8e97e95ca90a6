"""What a user gives the library is checked before any work, with one line that names the argument,
what it must be and what it is (validation.py, torch_backend/checks.py): never a raw torch error
from deep inside a layer, and never a silently wrong answer (a nan guidance weight that turns
guidance off, a uint8 image batch cast to float, bool labels read as class indices, a model with
NaN weights that samples NaN).
"""
import math

import numpy as np
import pytest
import torch

from tarflow_ref import (
    CheckpointError,
    Guidance,
    Sampler,
    TarFlowConfig,
    auto_strategy,
    denoise,
    denoising as np_denoising,
    from_numpy,
    jacobi as np_jacobi,
    load_checkpoint,
    model as np_model,
    sample,
    sample_gsj,
    to_numpy,
)
from tarflow_ref.assets import bundled_checkpoint
from tarflow_ref.config import ConfigError
from tarflow_ref.torch_backend import jacobi, sampling, textbook
from tarflow_ref.torch_backend.diagnostics import diagnose_torch
from tarflow_ref.training.train import TrainSettings, evaluate_bpd

from conftest import make_model

CFG = TarFlowConfig(image_size=4, patch_size=2, channels=1, width=16, blocks=2, layers=1, num_classes=3,
                    head_dim=8, noise_std=0.1)
STRATEGY = "G=[1,1] J=[3,3]"


@pytest.fixture(scope="module")
def model32():
    """A float32 model (the dtype of every checkpoint) with weights away from the initialisation."""
    return make_model(CFG, seed=3, dtype=torch.float32, out_scale=0.2)[0]


def tokens(dtype=torch.float32, batch=2):
    return torch.randn(batch, CFG.tokens, CFG.token_dim, generator=torch.Generator().manual_seed(0)).to(dtype)


def images(dtype=torch.float32, batch=2):
    return torch.rand(batch, CFG.channels, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(1)
                      ).to(dtype) * 2 - 1


# every torch entry point, called with its array argument replaced by `bad` (or its labels, by `bad_y`)
ENTRY_POINTS = {
    "model": ("x", lambda m, x, y: m(x, y), images),
    "model.loss": ("x", lambda m, x, y: m.loss(x, y), images),
    "sample": ("noise", lambda m, z, y: sample(m, z, y, Guidance(1.0)), tokens),
    "Sampler": ("noise", lambda m, z, y: Sampler(m)(z, y), tokens),
    "sample_gsj": ("noise", lambda m, z, y: sample_gsj(m, z, y, STRATEGY), tokens),
    "sampling.inverse": ("z", lambda m, z, y: sampling.inverse(m, z, y), tokens),
    "jacobi.inverse_gsj": ("z", lambda m, z, y: jacobi.inverse_gsj(m, z, y, strategy=STRATEGY), tokens),
    "textbook.inverse": ("z", lambda m, z, y: textbook.inverse(m, z, y), tokens),
    "denoise": ("x", lambda m, x, y: denoise(m, x, y), images),
    "diagnose_torch": ("images", lambda m, x, y: diagnose_torch(m, x, y), images),
}
BAD_ARRAYS = {
    "numpy": (lambda good: good.numpy(),
              "{name} must be a torch.Tensor, got numpy.ndarray (torch.from_numpy converts it)"),
    "list": (lambda good: good.tolist(), "{name} must be a torch.Tensor, got list"),
    "float64": (lambda good: good.double(), "{name} is torch.float64, the model's weights are torch.float32; "
                                            "convert it (.to(torch.float32))"),
    "uint8": (lambda good: ((good + 1) * 127).to(torch.uint8),
              "{name} must hold floating-point values, got torch.uint8"),
    "meta": (lambda good: good.to("meta"), "{name} is on device 'meta', the model on 'cpu'; move it (.to('cpu'))"),
}


@pytest.mark.parametrize("bad", list(BAD_ARRAYS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_an_array_of_the_wrong_kind_is_named_with_what_was_expected(model32, entry, bad):
    name, call, good = ENTRY_POINTS[entry]
    make_bad, message = BAD_ARRAYS[bad]
    y = torch.tensor([0, 2])
    call(model32, good(), y)                                          # the good input works
    with pytest.raises(ValueError) as err:
        call(model32, make_bad(good()), y)
    assert str(err.value) == message.format(name=name)


BAD_LABELS = {
    "bool": (torch.tensor([True, False]), "labels y must be signed integers (class indices, < 0 for no label), "
                                          "got torch.bool"),
    "float": (torch.tensor([1.0, 2.0]), "labels y must be signed integers (class indices, < 0 for no label), "
                                        "got torch.float32"),
    "uint8": (torch.tensor([1, 2], dtype=torch.uint8), "labels y must be signed integers (class indices, < 0 for no "
                                                       "label), got torch.uint8"),
    "numpy": (np.array([1, 2]), "y must be a torch.Tensor, got numpy.ndarray (torch.from_numpy converts it)"),
    "meta": (torch.tensor([1, 2], device="meta"), "y is on device 'meta', the model on 'cpu'; move it (.to('cpu'))"),
}


@pytest.mark.parametrize("bad", list(BAD_LABELS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_labels_must_be_signed_integers_of_the_model(model32, entry, bad):
    _, call, good = ENTRY_POINTS[entry]
    y, message = BAD_LABELS[bad]
    with pytest.raises(ValueError) as err:
        call(model32, good(), y)
    assert str(err.value) == message
    if bad == "bool":
        with pytest.raises(ValueError, match="labels y must be signed integers"):
            auto_strategy(model32, y)
    call(model32, good(), torch.tensor([2, -1], dtype=torch.int32))   # any signed integer type is a label


def test_the_numpy_reference_takes_numpy_arrays_and_signed_integer_labels(model32):
    params = to_numpy(model32)
    x, z = images(torch.float64).numpy(), tokens(torch.float64).numpy()
    np_model.forward(params, CFG, x.astype(np.float32), np.array([0, -1], dtype=np.int16))
    cases = [
        (lambda: np_model.forward(params, CFG, torch.from_numpy(x)), "x must be a numpy.ndarray, got torch.Tensor "
                                                                     "(np.asarray converts it)"),
        (lambda: np_model.forward(params, CFG, (x * 100).astype(np.uint8)), "x must hold floating-point values, "
                                                                             "got uint8"),
        (lambda: np_model.sample(params, CFG, z.tolist()), "noise must be a numpy.ndarray, got list"),
        (lambda: np_model.sample(params, CFG, z, np.array([True, False])), "labels y must be signed integers (class "
                                                                           "indices, < 0 for no label), got bool"),
        (lambda: np_model.forward(params, CFG, x, np.array([1.0, 2.0])), "labels y must be signed integers (class "
                                                                         "indices, < 0 for no label), got float64"),
        (lambda: np_jacobi.inverse_gsj(params, CFG, z, np.array([1, 2], np.uint64), strategy=STRATEGY),
         "labels y must be signed integers (class indices, < 0 for no label), got uint64"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message


def test_guidance_settings_that_would_change_nothing_silently_are_refused():
    """Guidance(weight=nan) used to turn guidance off (nan > 0 is False), what='' likewise, and
    temperature=nan made every unconditional attention NaN."""
    cases = [
        (dict(weight=math.nan), "guidance weight must be a finite number >= 0, got nan"),
        (dict(weight=math.inf), "guidance weight must be a finite number >= 0, got inf"),
        (dict(weight="2"), "guidance weight must be a finite number >= 0, got '2'"),
        (dict(weight=True), "guidance weight must be a finite number >= 0, got True"),
        (dict(weight=1.0, what=""), "guide what must be 'a' (log-scale), 'b' (shift) or 'ab', got ''"),
        (dict(weight=1.0, what=None), "guide what must be 'a' (log-scale), 'b' (shift) or 'ab', got None"),
        (dict(weight=1.0, temperature=math.nan), "attention temperature must be a finite number > 0, got nan"),
        (dict(weight=1.0, temperature=-math.inf), "attention temperature must be a finite number > 0, got -inf"),
        (dict(weight=1.0, annealed="no"), "annealed must be True or False, got 'no'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as err:
            Guidance(**kwargs)
        assert str(err.value) == message
    assert Guidance(np.float64(2.0), "ba", np.True_, np.float32(0.5)).active


def test_a_guidance_that_is_not_a_guidance_object_is_refused(model32):
    params = to_numpy(model32)
    message = "guidance must be a Guidance (or None), got float 2.0: pass Guidance(weight=...)"
    for call in (lambda: sample(model32, tokens(), None, 2.0),
                 lambda: sample_gsj(model32, tokens(), None, STRATEGY, 2.0),
                 lambda: np_model.sample(params, CFG, tokens(torch.float64).numpy(), None, 2.0)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message


@pytest.mark.parametrize("noise_std", [math.nan, -1, -1e-9, math.inf, "0.1", True])
def test_load_checkpoint_refuses_a_sigma_that_is_not_a_finite_number_at_least_zero(noise_std):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bundled_checkpoint(), noise_std=noise_std)
    shown = repr(noise_std) if isinstance(noise_std, str) else str(noise_std)
    assert str(err.value) == f"noise_std (sigma of the training noise) must be a finite number >= 0, got {shown}"


def test_a_configuration_of_non_integers_or_a_bad_sigma_is_refused():
    for field, value in (("image_size", 8.0), ("blocks", True), ("num_classes", 2.5)):
        with pytest.raises(ConfigError, match=f"{field} must be an integer, got {value}"):
            CFG.replace(**{field: value})
    with pytest.raises(ConfigError, match="noise_std .* must be a finite number >= 0, got nan"):
        CFG.replace(noise_std=math.nan)
    assert load_checkpoint(bundled_checkpoint(), noise_std=0.0).config.noise_std == 0.0


@pytest.fixture
def diverged(model32):
    """A copy of the model with one weight set to NaN in memory, after it was loaded."""
    model = make_model(CFG, seed=3, dtype=torch.float32, out_scale=0.2)[0]
    with torch.no_grad():
        model.blocks[1].attn_blocks[0].mlp.main[0].weight[2, 3] = math.nan
    return model


def test_a_model_with_nan_weights_in_memory_is_refused_by_every_sampler_and_denoiser(diverged):
    key = "blocks.1.attn_blocks.0.mlp.main.0.weight"
    message = f"the weights hold NaN or infinite values (in '{key}'): the model diverged in training; it cannot be "
    params = to_numpy(diverged)
    z, x, y = tokens(), images(), torch.tensor([0, 1])
    calls = {
        "sampled": [lambda: sample(diverged, z, y), lambda: Sampler(diverged, Guidance(1.0))(z, y),
                    lambda: sample_gsj(diverged, z, y, STRATEGY), lambda: sample_gsj(diverged, z, y, "auto"),
                    lambda: np_model.sample(params, CFG, z.double().numpy(), y.numpy()),
                    lambda: np_model.sample(params, CFG, z.double().numpy(), y.numpy(),
                                            sampler=np_jacobi.gs_jacobi(STRATEGY))],
        "used to denoise": [lambda: denoise(diverged, x, y),
                            lambda: np_denoising.denoise(params, CFG, x.double().numpy(), y.numpy())],
        "searched": [lambda: auto_strategy(diverged, y)],
        "evaluated": [lambda: evaluate_bpd(diverged, np.zeros((2, 1, 4, 4), np.uint8))],
        "evaluated or sampled": [lambda: from_numpy(params, CFG)],
    }
    for use, functions in calls.items():
        for call in functions:
            with pytest.raises(ValueError) as err:
                call()
            assert str(err.value) == message + use


def test_seeds_are_integers_from_0_to_2_to_the_32_minus_1(model32):
    for bad in (-1, 2 ** 32, 2 ** 70, 1.5, True):
        with pytest.raises(ValueError, match=r"seed must be an integer in 0\.\.4294967295, got "):
            TrainSettings(seed=bad)
        with pytest.raises(ValueError, match=r"seed must be an integer in 0\.\.4294967295, got "):
            evaluate_bpd(model32, np.zeros((2, 1, 4, 4), np.uint8), seed=bad)
    assert TrainSettings(seed=2 ** 32 - 1).seed == 2 ** 32 - 1
