"""Shared test helpers: small random configurations with weights away from the initialisation."""
import numpy as np
import pytest
import torch

from tarflow_ref import TarFlow, TarFlowConfig, to_numpy
from tarflow_ref.torch_backend.model import randomize_

torch.set_num_threads(2)


def make_model(cfg: TarFlowConfig, seed=0, dtype=torch.float64, out_scale=0.3):
    """(torch model in `dtype`, NumPy params in float64) with the same random weights."""
    model = randomize_(TarFlow(cfg).to(dtype), seed, out_scale).eval()
    return model, to_numpy(model)


SMALL_CONFIGS = {
    "cond-even-P2": TarFlowConfig(image_size=8, patch_size=2, channels=3, width=32, blocks=2, layers=2,
                                  num_classes=4, head_dim=8),
    "uncond-odd-P4": TarFlowConfig(image_size=8, patch_size=4, channels=3, width=32, blocks=3, layers=1,
                                   num_classes=0, head_dim=16),
    "cond-odd-P1-gray": TarFlowConfig(image_size=4, patch_size=1, channels=1, width=16, blocks=1, layers=2,
                                      num_classes=3, head_dim=8),
}


@pytest.fixture(params=list(SMALL_CONFIGS), ids=list(SMALL_CONFIGS))
def small(request):
    """(name, cfg, torch model float64, numpy params) for each small configuration."""
    cfg = SMALL_CONFIGS[request.param]
    model, params = make_model(cfg, seed=len(request.param))
    return request.param, cfg, model, params


def not_implemented(*args):
    """A student's function before the student wrote it (the released notebooks' stub)."""
    raise NotImplementedError()


def with_nan(x):
    """A copy of x as float64 with its last entry NaN (a broken answer for the grading checks)."""
    x = np.array(x, dtype=np.float64)
    x.flat[-1] = np.nan
    return x


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
