"""The FID pipeline (evaluation/fid.py, evaluation/digit_features.py, torch_backend/draw.py): the
uint8 conversion, the statistics files in the released layout (written here independently, as torchmetrics' state dict
would be, and read strictly), the FID of images against their own statistics, a resumed run, and
the bundled digits' feature network and statistics file."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tarflow_ref import Guidance, load_checkpoint
from tarflow_ref.assets import bundled_checkpoint, bundled_fid_stats
from tarflow_ref.evaluation.digit_features import DigitFeatures
from tarflow_ref.evaluation.fid import (
    ArrayImages,
    StatsFileError,
    accumulate,
    read_images,
    read_stats_file,
    to_uint8,
    write_stats_file,
)
from tarflow_ref.frechet import FeatureStats
from tarflow_ref.torch_backend.denoising import denoise
from tarflow_ref.torch_backend.draw import SampleStream
from tarflow_ref.torch_backend.inception import InceptionV3, randomize_
from tarflow_ref.torch_backend.sampling import Sampler
from tarflow_ref.training.data import load_digits_split


def test_to_uint8_clips_maps_and_truncates():
    x = torch.tensor([-3.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 2.0])
    # 0.5 (x + 1) * 255 = [clip 0, 0, 0.1275, 127.5, 191.25, 254.87, 255, clip 255]: truncated, not rounded
    assert to_uint8(x).tolist() == [0, 0, 0, 127, 191, 254, 255, 255]
    assert to_uint8(x).dtype == torch.uint8
    # floats in [0, 1] read from files go through the same truncation
    assert ArrayImages(np.array([0.0, 0.5, 0.999, 1.0], np.float32).reshape(1, 1, 2, 2)).batch(0).flatten().tolist() \
        == [0, 127, 254, 255]


# ---- the released layout ---------------------------------------------------------------------------

def real_looking_stats(dim, n, seed):
    """Sums of n features like pooled ReLU activations (non-negative, correlated), streamed in batches."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((dim, 64)) / 8
    stats = FeatureStats.empty(dim)
    for _ in range(n // 500):
        stats.add(np.abs(rng.standard_normal((500, 64)) @ mix.T + 0.3).astype(np.float32))
    return stats


def torchmetrics_layout(network, stats: FeatureStats) -> dict:
    """The state dict of a FrechetInceptionDistance with its states as buffers, built from the facts
    (book/checkpoints.md, "FID statistics files"), not by write_stats_file."""
    F = stats.dim
    state = {f"{network.prefix}.{k}": v.clone() for k, v in network.state_dict().items()}
    state.update({
        "real_features_sum": torch.tensor(stats.feature_sum, dtype=torch.float64),
        "real_features_cov_sum": torch.tensor(stats.cov_sum, dtype=torch.float64),
        "real_features_num_samples": torch.tensor(stats.n, dtype=torch.int64),
        "fake_features_sum": torch.zeros(F, dtype=torch.float64),
        "fake_features_cov_sum": torch.zeros(F, F, dtype=torch.float64),
        "fake_features_num_samples": torch.tensor(0, dtype=torch.int64),
    })
    return state


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """(path, network, stats) of a synthetic released-layout file: random weights, real-looking sums."""
    net = randomize_(InceptionV3(), seed=11).eval()
    stats = real_looking_stats(2048, 2000, seed=0)
    path = tmp_path_factory.mktemp("stats") / "synthetic_fid_stats.pth"
    torch.save(torchmetrics_layout(net, stats), path)
    return path, net, stats


def test_a_released_layout_file_loads_strictly(inception_file):
    path, net, stats = inception_file
    state = torch.load(path, weights_only=True)
    assert len(state) == 572 and sum(k.startswith("inception.") for k in state) == 566
    real, loaded = read_stats_file(path)
    assert isinstance(loaded, InceptionV3) and not loaded.training
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert real.n == 2000 and np.array_equal(real.cov_sum, stats.cov_sum)
    assert np.array_equal(real.feature_sum, stats.feature_sum)


def test_written_files_have_the_released_layout(inception_file, tmp_path):
    path, net, stats = inception_file
    ours = tmp_path / "ours.pth"
    write_stats_file(ours, stats, net)
    mine, theirs = torch.load(ours, weights_only=True), torch.load(path, weights_only=True)
    assert set(mine) == set(theirs)
    for k, v in theirs.items():
        assert mine[k].dtype == v.dtype and mine[k].shape == v.shape and torch.equal(mine[k], v), k


@pytest.fixture(scope="module")
def digits_state():
    """The bundled digits statistics file as a state dict (small: for the bad-file cases)."""
    return torch.load(bundled_fid_stats(), weights_only=True)


class Payload:
    """A pickled object that a weights_only load must refuse."""
    def __reduce__(self):
        return (print, ("ran code from the file",))


def bad(state, change):
    state = dict(state)
    change(state)
    return state


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("digit_features.conv2.bias"),
     (r"not a statistics file in the released layout: "
      r"missing key 'digit_features.conv2.bias' \(expected shape \[64\]\)$")),
    (lambda s: s.update(extra=torch.zeros(3)), r"released layout: unexpected key 'extra' \(shape \[3\]\)$"),
    (lambda s: s.update(real_features_sum=torch.zeros(63, dtype=torch.float64)),
     r"released layout: key 'real_features_sum' has shape \[63\], expected \[64\]$"),
    (lambda s: s.update(real_features_cov_sum=s["real_features_cov_sum"].float()),
     r"released layout: 'real_features_cov_sum' is torch.float32, expected torch.float64$"),
    (lambda s: s.update(real_features_num_samples=torch.tensor(1)),
     r"'real_features_num_samples' is 1; a covariance needs at least 2$"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("digit_features.")],
     r"no feature network \(no 'inception.\*' or 'digit_features.\*' entries\)$"),
    (lambda s: s.update(real_features_sum=Payload()),
     r"refused to load: the file holds objects other than tensors"),
], ids=["missing", "extra", "shape", "dtype", "count", "no-network", "pickled"])
def test_each_bad_file_gives_one_clear_error(digits_state, tmp_path, capsys, change, message):
    path = tmp_path / "bad.pth"
    torch.save(bad(digits_state, change), path)
    with pytest.raises(StatsFileError, match=message) as err:
        read_stats_file(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    assert "ran code" not in capsys.readouterr().out


def test_a_missing_inception_key_is_named(inception_file, tmp_path):
    path = tmp_path / "bad.pth"
    state = torch.load(inception_file[0], weights_only=True)
    del state["inception.Mixed_7c.branch_pool.bn.running_var"]
    torch.save(state, path)
    with pytest.raises(StatsFileError, match=r"missing key 'inception.Mixed_7c.branch_pool.bn.running_var' "
                                             r"\(expected shape \[192\]\)$"):
        read_stats_file(path)
    with pytest.raises(StatsFileError, match="no such statistics file"):
        read_stats_file(tmp_path / "absent.pth")


# ---- FID of images against statistics ----------------------------------------------------------------

def test_fid_of_images_against_their_own_statistics_is_zero(inception_file, tmp_path):
    """Through the whole pipeline with the Inception layout: images -> file -> read back -> FID, with
    other batch boundaries. Bound: |FID| < 1e-5 tr(Sigma) for the same 16 images (a rank-15
    covariance in 2048 dimensions: the zero eigenvalues of the product come out as rounding noise).
    (A 2048-dimensional FID is costly on a CPU; the growth with noise is shown on the digits below.)"""
    _, net, _ = inception_file
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (16, 3, 4, 4), generator=gen).float()
    images = F.interpolate(blocks, size=24, mode="nearest").to(torch.uint8)
    own = accumulate(ArrayImages(images, batch_size=8), net).stats
    write_stats_file(tmp_path / "own.pth", own, net)
    reference, loaded = read_stats_file(tmp_path / "own.pth")
    again = accumulate(ArrayImages(images, batch_size=5), loaded).stats
    assert np.allclose(again.cov_sum, own.cov_sum, rtol=1e-6, atol=0)
    assert abs(again.frechet_distance(reference)) < 1e-5 * np.trace(reference.cov())


def test_held_out_digits_against_the_bundled_file_zero_and_growing_with_noise():
    """The bound for the same 360 digits: |FID| < 1e-9 tr(Sigma) (full-rank 64-dimensional covariance)."""
    reference, net = read_stats_file(bundled_fid_stats())
    images, labels = load_digits_split("test")
    assert (net.classify(torch.as_tensor(images)) == torch.as_tensor(labels)).float().mean() > 0.95
    own = accumulate(ArrayImages(images), net).stats
    assert own.n == 360 and abs(own.frechet_distance(reference)) < 1e-9 * np.trace(reference.cov())
    gen = torch.Generator().manual_seed(0)
    fids = [accumulate(ArrayImages((torch.as_tensor(images) + torch.randn(images.shape, generator=gen) * sd)
                                   .clamp(0, 255).to(torch.uint8)), net).stats.frechet_distance(reference)
            for sd in (8.0, 32.0, 96.0)]
    assert 1.0 < fids[0] < fids[1] < fids[2]


def test_image_files_read_like_the_arrays(tmp_path):
    from PIL import Image

    images, _ = load_digits_split("test")
    for i, img in enumerate(images[:30]):
        (tmp_path / "sub" if i % 2 else tmp_path).mkdir(exist_ok=True)
        Image.fromarray(img[0]).save((tmp_path / "sub" if i % 2 else tmp_path) / f"{i:03d}.png")
    folder = read_images(tmp_path, channels=1, batch_size=7)
    got = torch.cat([folder.batch(s) for s in folder.starts()])
    order = sorted(range(30), key=lambda i: str((tmp_path / "sub" if i % 2 else tmp_path) / f"{i:03d}.png"))
    assert torch.equal(got, torch.as_tensor(images[:30][order]))
    np.save(tmp_path / "x.npy", images[:30].transpose(0, 2, 3, 1))                 # channels last
    np.savez(tmp_path / "x.npz", images[:30])
    for name in ("x.npy", "x.npz"):
        source = read_images(tmp_path / name, channels=1)
        assert torch.equal(source.batch(0), torch.as_tensor(images[:30])), name
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\], these span \[-1, 1\]"):
        ArrayImages(np.linspace(-1, 1, 64).reshape(1, 1, 8, 8))


# ---- a resumed run -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    """The bundled model and statistics, on one thread (as the command line runs this small model:
    its per-token products are too small to share, and shared threads crawl on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = load_checkpoint(bundled_checkpoint())
    reference, net = read_stats_file(bundled_fid_stats())
    yield model, reference, net
    torch.set_num_threads(threads)


def stream(model, n=20, batch_size=4):
    draw = Sampler(model, Guidance(1.0))
    labels = torch.arange(n) % 10
    return SampleStream(lambda z, y: draw(z, y), model.config, n, batch_size, labels, seed=3,
                        denoise=lambda x, y: denoise(model, x, y))


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_fid(digits, tmp_path):
    model, reference, net = digits
    whole = accumulate(stream(model), net)
    assert whole.complete and whole.stats.n == 20
    fid = whole.stats.frechet_distance(reference)

    state = tmp_path / "run.pt"
    killed = stream(model)
    batch, calls = killed.batch, []

    def dies_at_the_fourth(start):
        calls.append(start)
        if len(calls) == 4:
            raise Killed()
        return batch(start)
    killed.batch = dies_at_the_fourth
    with pytest.raises(Killed):
        accumulate(killed, net, state_path=state, save_every=2)
    resumed_from = []
    again = stream(model)
    batch_again = again.batch
    again.batch = lambda start: resumed_from.append(start) or batch_again(start)
    resumed = accumulate(again, net, state_path=state, save_every=2)
    assert resumed_from[0] == 8                                        # after the two saved batches
    assert resumed.complete and resumed.stats.n == 20
    assert np.array_equal(resumed.stats.cov_sum, whole.stats.cov_sum)
    assert resumed.stats.frechet_distance(reference) == fid

    # stopping on purpose, twice, then finishing
    stepwise = tmp_path / "stepwise.pt"
    for done in (2, 4):
        part = accumulate(stream(model), net, state_path=stepwise, stop_after=2)
        assert not part.complete and part.stats.n == 4 * done
    assert accumulate(stream(model), net, state_path=stepwise).stats.frechet_distance(reference) == fid


def test_a_state_from_other_settings_is_refused(digits, tmp_path):
    model, _, net = digits
    state = tmp_path / "run.pt"
    accumulate(stream(model, n=8), net, state_path=state, settings={"cfg": 1.0}, stop_after=1)
    with pytest.raises(StatsFileError, match=r"run.pt belongs to a run with other settings "
                                             r"\(cfg: 1.0 there, 2.0 now\)"):
        accumulate(stream(model, n=8), net, state_path=state, settings={"cfg": 2.0})
    assert accumulate(stream(model, n=8), net, state_path=state, settings={"cfg": 2.0}, restart=True).complete
    state.write_bytes(b"not a torch file")
    with pytest.raises(StatsFileError, match="not a readable fid run state"):
        accumulate(stream(model, n=8), net, state_path=state)


def test_the_digit_network_training_is_deterministic(digits):
    """Two epochs of the recipe from the same seed give the same weights twice (the asset's command is
    deterministic), and the bundled network has the architecture of the module."""
    from tarflow_ref.evaluation.digit_features import train_digit_features

    a, b = train_digit_features(seed=1, epochs=1), train_digit_features(seed=1, epochs=1)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    _, bundled = read_stats_file(bundled_fid_stats())
    assert isinstance(bundled, DigitFeatures) and bundled.features == 64


def test_a_batch_holding_nan_is_drawn_again_with_fresh_noise_that_leaves_the_stream_alone():
    from tarflow_ref import TarFlowConfig
    from tarflow_ref.torch_backend.draw import MAX_REDRAWS, NanSamples

    cfg = TarFlowConfig(image_size=2, patch_size=1, channels=1, width=64, blocks=1, layers=1)
    seen = []

    def sampler(noise, y):                                             # noise [3, 4, 1] -> images [3, 1, 2, 2]
        seen.append(noise.clone())
        x = noise.reshape(len(noise), 1, 2, 2).clone()
        if len(seen) == 1:
            x[1, 0, 0, 0] = float("nan")
        return x
    stream = SampleStream(sampler, cfg, n=6, batch_size=3, seed=7)
    x, later = stream.batch(0), stream.batch(3)
    gen = torch.Generator().manual_seed(7)
    first, second = torch.randn(3, 4, 1, generator=gen), torch.randn(3, 4, 1, generator=gen)
    redraw = torch.randn(3, 4, 1, generator=torch.Generator().manual_seed((7 << 32) + 1))   # (seed, batch 0)
    assert len(seen) == 3 and torch.equal(seen[0], first) and torch.equal(seen[1], redraw)
    assert torch.equal(x, redraw.reshape(3, 1, 2, 2))
    assert torch.equal(later, second.reshape(3, 1, 2, 2))             # the next batch's noise as without a NaN
    always = SampleStream(lambda noise, y: noise * float("nan"), cfg, n=3, batch_size=3)
    with pytest.raises(NanSamples, match=f"{MAX_REDRAWS} batches in a row came out NaN"):
        always.batch(0)


def test_a_stream_gives_each_batch_its_own_noise_whichever_batches_it_is_asked_for():
    from tarflow_ref import TarFlowConfig

    cfg = TarFlowConfig(image_size=2, patch_size=1, channels=1, width=64, blocks=1, layers=1)

    def new():                                                           # 11 images: batches at 0, 3, 6, 9 (of 2)
        return SampleStream(lambda noise, y: noise.reshape(len(noise), 1, 2, 2), cfg, n=11, batch_size=3, seed=5)
    whole = new()
    every = {start: whole.batch(start) for start in whole.starts()}
    odd = new()                                                          # rank 1 of 2
    assert all(torch.equal(odd.batch(start), every[start]) for start in (3, 9))
    with pytest.raises(ValueError, match="increasing order"):
        odd.batch(6)
    saved = new()
    saved.batch(0)
    state = saved.state(6)                                               # batches 0 and 3 done, wherever drawn
    resumed = new()
    resumed.restore(state)
    assert torch.equal(resumed.batch(9), every[9]) and new().state(11)["start"] == 11
    end = new()
    end.batch(9)
    assert end.state(11)["start"] == 11                                  # after the last, shorter batch
