"""The FID Inception network (torch_backend/inception.py): its key layout, the TensorFlow 1 resize on
hand-worked cases, and the whole network against torch-fidelity's `feature_extractor_inceptionv3`,
an independent implementation of the same architecture, run with the same random weights.

torch-fidelity cannot be imported normally here (its package `__init__` imports torchvision, which
does not install beside the CPU torch), so the oracle loads its module files one by one under a
stub package. setup.sh installs it with `--no-deps`; where it is absent the oracle test skips.
"""
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tarflow_ref.torch_backend.inception import InceptionV3, randomize_, resize_tf1


@pytest.fixture(scope="module")
def net():
    return randomize_(InceptionV3(), seed=3).eval()


def test_the_state_dict_has_the_released_layout(net):
    state = net.state_dict()
    assert len(state) == 566
    convs = [k[:-len(".conv.weight")] for k in state if k.endswith(".conv.weight")]
    assert len(convs) == 94
    for name in convs:
        assert {f"{name}.bn.{p}" for p in ("weight", "bias", "running_mean", "running_var",
                                           "num_batches_tracked")} <= set(state)
        assert f"{name}.conv.bias" not in state
    assert state["fc.weight"].shape == (1008, 2048) and state["fc.bias"].shape == (1008,)
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)


def test_resize_equals_the_tf1_formula_on_hand_worked_cases():
    # 1-D, 2 -> 4: s = i * 2/4 = 0, 0.5, 1, 1.5 -> rows (0,1,0), (0,1,.5), (1,1,0), (1,1,.5) (index 2 clamped)
    x = torch.tensor([[[[10.0, 20.0]]]])                               # [1, 1, 1, 2]
    x = x.expand(1, 1, 2, 2)
    out = resize_tf1(x, 4)
    assert out[0, 0, 0].tolist() == [10.0, 15.0, 20.0, 20.0]
    # 3 -> 2: s = 0, 1.5 -> a, (b + c) / 2
    x = torch.tensor([[0.0, 4.0, 8.0], [12.0, 16.0, 20.0], [24.0, 28.0, 32.0]])[None, None]
    assert resize_tf1(x, 2)[0, 0].tolist() == [[0.0, 6.0], [18.0, 24.0]]
    # 2 -> 3 in 2-D: s = 0, 2/3, 4/3 -> weights 0, 2/3 and the clamped last row/column
    x = torch.tensor([[0.0, 3.0], [6.0, 9.0]])[None, None]
    expect = [[0.0, 2.0, 3.0], [4.0, 6.0, 7.0], [6.0, 8.0, 9.0]]
    np.testing.assert_allclose(resize_tf1(x, 3)[0, 0].numpy(), expect, rtol=0, atol=1e-6)
    # not torch's half-pixel bilinear, which gives [10, 12.5, 17.5, 20] for the first case
    half_pixel = F.interpolate(torch.tensor([[[[10.0, 20.0]]]]).expand(1, 1, 2, 2), size=4, mode="bilinear",
                               align_corners=False)
    assert half_pixel[0, 0, 0].tolist() == [10.0, 12.5, 17.5, 20.0]


def test_resize_to_the_same_size_is_the_identity():
    x = torch.rand(2, 3, 7, 7)
    assert torch.equal(resize_tf1(x, 7), x)


def load_torch_fidelity_inception():
    """torch-fidelity's FeatureExtractorInceptionV3 class, loaded without its package __init__, or None."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(root)]
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    sys.modules["torch_fidelity"] = package
    try:
        for name in ("defaults", "deprecations", "helpers", "interpolate_compat_tensorflow", "feature_extractor_base",
                     "feature_extractor_inceptionv3"):
            module_spec = importlib.util.spec_from_file_location(f"torch_fidelity.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        return module.FeatureExtractorInceptionV3
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_the_whole_network_equals_torch_fidelity(net, tmp_path):
    oracle_class = load_torch_fidelity_inception()
    if oracle_class is None:
        print("SKIPPED: torch-fidelity is not installed (setup.sh installs it with --no-deps)")
        pytest.skip("torch-fidelity is not installed (setup.sh installs it with --no-deps)")
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)                  # our own file: the oracle loads it with pickle
    oracle = oracle_class("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)).eval()
    gen = torch.Generator().manual_seed(0)
    for size in (64, 37, 299):                             # upsampled, odd, and the native size
        images = blotchy_images(2, size, gen)
        ours = net(images)
        (theirs,) = oracle(images)
        assert ours.shape == theirs.shape == (2, 2048)
        scale = theirs.abs().max()
        print(size, float((ours - theirs).abs().max()), float(scale), float((theirs[0] - theirs[1]).abs().max()))
        assert (ours - theirs).abs().max() <= 1e-5 * scale, ((ours - theirs).abs().max(), scale)
        # the check has teeth: the two images' features differ by far more than the tolerance
        assert (theirs[0] - theirs[1]).abs().max() > 1000 * 1e-5 * scale


def blotchy_images(n, size, gen):
    """uint8 [n, 3, size, size]: 5x5 random colour blocks enlarged (pooled features of white noise
    hardly differ between images)."""
    blocks = torch.randint(0, 256, (n, 3, 5, 5), generator=gen).float()
    return F.interpolate(blocks, size=size, mode="nearest").to(torch.uint8)


def test_grey_images_are_read_as_rgb(net):
    grey = torch.randint(0, 256, (1, 1, 16, 16), dtype=torch.uint8)
    assert torch.equal(net(grey), net(grey.expand(1, 3, 16, 16).contiguous()))
    with pytest.raises(ValueError, match=r"uint8 images \[B, 3, H, W\].*torch.float32"):
        net(grey.float())
