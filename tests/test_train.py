"""Training (train.py), data (data.py) and the flow as a Bayes classifier (bayes.py).

Independent references: the NumPy float64 model for likelihoods, the closed-form schedule,
an uninterrupted run for resuming, hand-built images for the folder loader.
"""
import math
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from tarflow_ref import TarFlowConfig, load_checkpoint, model as np_model, to_numpy
from tarflow_ref.torch_backend.bayes import class_log_likelihoods, classify, log_posterior
from tarflow_ref.training.data import center_crop, load_digits_split, load_image_folder, to_model_range
from tarflow_ref.training.train import (
    TrainSettings,
    batch_indices,
    evaluate_bpd,
    lr_factor,
    make_optimizer,
    resume_path,
    train,
    training_batch,
)

from conftest import make_model

TINY = dict(patch_size=2, width=64, blocks=2, layers=1, batch_size=32, warmup=5, lr=2e-3)


# ---- data -----------------------------------------------------------------------------------------

def test_digits_split_is_fixed_disjoint_and_keeps_the_17_levels():
    train_x, train_y = load_digits_split("train")
    test_x, test_y = load_digits_split("test")
    all_x, all_y = load_digits_split("all")
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8) and train_x.dtype == np.uint8
    assert np.array_equal(test_x, all_x[::5]) and np.array_equal(test_y, all_y[::5])
    assert sorted(np.unique(train_y)) == list(range(10)) and sorted(np.unique(test_y)) == list(range(10))
    from sklearn.datasets import load_digits
    levels = load_digits().images[::5]                                        # 0..16
    assert np.array_equal(test_x[:, 0], np.rint(levels * 255 / 16).astype(np.uint8))
    assert len(np.unique(all_x)) == 17
    x = to_model_range(all_x)
    assert x.min() == -1 and x.max() == 1


def test_bad_split_is_named():
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        load_digits_split("valid")


def write_image(path, array):
    Image.fromarray(array).save(path)


def test_image_folder_resizes_crops_and_labels_by_sorted_folder(tmp_path):
    # a 12 x 6 image (w x h) whose middle 6 x 6 square is white: the centre crop keeps exactly it
    wide = np.zeros((6, 12, 3), np.uint8)
    wide[:, 3:9] = 255
    (tmp_path / "b_cats").mkdir()
    (tmp_path / "a_dogs").mkdir()
    write_image(tmp_path / "b_cats" / "0.png", wide)
    write_image(tmp_path / "a_dogs" / "0.png", np.full((10, 10, 3), 60, np.uint8))
    write_image(tmp_path / "a_dogs" / "1.jpg", np.full((20, 30, 3), 200, np.uint8))
    (tmp_path / "a_dogs" / "notes.txt").write_text("not an image")
    images, labels, classes = load_image_folder(tmp_path, image_size=6)
    assert classes == ["a_dogs", "b_cats"]
    assert images.shape == (3, 3, 6, 6) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 1]
    assert np.all(images[2] == 255)
    assert np.all(np.abs(images[1].astype(int) - 200) <= 1)
    grey, _, _ = load_image_folder(tmp_path, image_size=4, channels=1)
    assert grey.shape == (3, 1, 4, 4)


def test_center_crop_of_a_tall_image_takes_the_middle():
    tall = np.zeros((9, 3), np.uint8)
    tall[3:6] = 255
    out = np.asarray(center_crop(Image.fromarray(tall), 3))
    assert out.shape == (3, 3) and np.all(out == 255)


def write_png(path, width, height, bit_depth, color_type, rows):
    """A PNG written byte by byte (Pillow cannot write 16-bit RGB, nor a header that lies about the size)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rows))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_hidden_folders_and_files_are_not_data(tmp_path):
    for name, value in (("a", 10), ("b", 200)):
        (tmp_path / name).mkdir()
        write_image(tmp_path / name / "0.png", np.full((4, 4), value, np.uint8))
    (tmp_path / ".ipynb_checkpoints").mkdir()                            # sorts first: would take label 0
    write_image(tmp_path / ".ipynb_checkpoints" / "0-checkpoint.png", np.zeros((4, 4), np.uint8))
    write_image(tmp_path / "b" / "._0.png", np.zeros((4, 4), np.uint8))  # macOS metadata beside a file
    images, labels, classes = load_image_folder(tmp_path, image_size=4, channels=1)
    assert classes == ["a", "b"] and labels.tolist() == [0, 1]
    assert images[:, 0, 0, 0].tolist() == [10, 200]


def test_an_empty_class_folder_is_an_error_not_a_label_shift(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    write_image(tmp_path / "a" / "0.png", np.zeros((4, 4), np.uint8))
    write_image(tmp_path / "c" / "0.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'b'}: a class folder with no images .* the labels follow "
                                         r"the sorted folder names, so remove it or add images"):
        load_image_folder(tmp_path, 4, channels=1)


def test_16_bit_images_keep_their_grey_levels(tmp_path):
    (tmp_path / "a").mkdir()
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)   # 8-bit level k as 257 k
    Image.fromarray(ramp).save(tmp_path / "a" / "grey16.png")
    rgb = (np.arange(16 * 16 * 3, dtype=np.uint32) * 85).astype(">u2").reshape(16, 16, 3)
    write_png(tmp_path / "a" / "rgb16.png", 16, 16, 16, 2, [row.tobytes() for row in rgb])
    images, _, _ = load_image_folder(tmp_path, image_size=16, channels=1)
    assert np.array_equal(images[0, 0], np.arange(256, dtype=np.uint8).reshape(16, 16))  # not 2 levels
    images, _, _ = load_image_folder(tmp_path, image_size=16, channels=3)
    assert np.array_equal(images[0], np.repeat(np.arange(256, dtype=np.uint8).reshape(1, 16, 16), 3, 0))
    assert np.array_equal(images[1], (rgb.astype(np.int64) >> 8).astype(np.uint8).transpose(2, 0, 1))


def test_a_decompression_bomb_is_one_clear_error(tmp_path):
    """A 157-byte PNG whose header claims 40000 x 40000 pixels (1.6 GB once decoded)."""
    (tmp_path / "a").mkdir()
    write_png(tmp_path / "a" / "bomb.png", 40000, 40000, 8, 0, [bytes(40000)] * 2)
    with pytest.raises(ValueError, match=r"bomb.png: refused: Image size \(1600000000 pixels\) exceeds limit"):
        load_image_folder(tmp_path, 8, channels=1)
    big = tmp_path / "a" / "bomb.png"                                  # above the warning limit only
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    write_png(big, side, side, 8, 0, [bytes(side)] * 2)
    with pytest.raises(ValueError, match=r"bomb.png: refused: Image size .* exceeds limit"):
        load_image_folder(tmp_path, 8, channels=1)


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no such image folder"):
        load_image_folder(tmp_path / "missing", 8)
    with pytest.raises(ValueError, match="one sub-folder per class"):
        load_image_folder(tmp_path, 8)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path, 8)


# ---- schedule, batches, settings --------------------------------------------------------------------

def test_lr_schedule_is_linear_warmup_then_cosine():
    warmup, steps = 10, 110
    assert lr_factor(0, warmup, steps) == pytest.approx(0.1)
    assert lr_factor(9, warmup, steps) == pytest.approx(1.0)
    assert lr_factor(10, warmup, steps) == pytest.approx(1.0)
    assert lr_factor(60, warmup, steps) == pytest.approx(0.5)            # half-way down the cosine
    assert lr_factor(35, warmup, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    model = torch.nn.Linear(2, 2)
    s = TrainSettings(steps=steps, warmup=warmup, lr=3e-3)
    opt, sched = make_optimizer(model, s)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([3e-3 * lr_factor(k, warmup, steps) for k in range(steps)])
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["weight_decay"] == 1e-4


def test_each_epoch_visits_every_image_once():
    n, batch = 10, 4
    stream = torch.cat([batch_indices(n, batch, seed=3, step=k) for k in range(5)])   # 20 = two epochs
    assert sorted(stream[:10].tolist()) == list(range(n)) and sorted(stream[10:].tolist()) == list(range(n))
    assert not torch.equal(stream[:10], stream[10:])
    assert torch.equal(batch_indices(n, batch, 3, 2), stream[8:12])


def test_training_batch_adds_sigma_noise_drops_labels_and_is_fixed_by_seed_and_step():
    images, labels = load_digits_split("train")
    s = TrainSettings(batch_size=4000, noise_std=0.3, drop_label=0.1)
    x, y = training_batch(images, labels, s, step=7)
    idx = batch_indices(len(images), s.batch_size, s.seed, 7)
    eps = (x - to_model_range(images[idx.numpy()])) / 0.3
    assert abs(eps.mean().item()) < 0.01 and abs(eps.std().item() - 1) < 0.01
    dropped = (y == -1).float().mean().item()
    assert 0.08 < dropped < 0.12
    kept = y >= 0
    assert torch.equal(y[kept], torch.as_tensor(labels[idx.numpy()])[kept])
    x2, y2 = training_batch(images, labels, s, step=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = training_batch(images, labels, s, step=8)
    assert not torch.equal(x, x3)
    assert training_batch(images, labels, TrainSettings(conditional=False), 0)[1] is None


def test_flip_mirrors_about_half_of_the_images():
    images = np.arange(64, dtype=np.uint8).reshape(1, 1, 8, 8).repeat(400, 0)
    s = TrainSettings(batch_size=400, noise_std=0.0, flip=True)
    x, _ = training_batch(images, np.zeros(400, np.int64), s, 0)
    clean = to_model_range(images[:1])
    flipped = (x == clean.flip(-1)).flatten(1).all(1)
    same = (x == clean).flatten(1).all(1)
    assert torch.all(flipped ^ same) and 0.4 < flipped.float().mean().item() < 0.6


@pytest.mark.parametrize("changes, message", [
    (dict(width=96), "multiple of 64"),
    (dict(steps=0), "steps must be positive"),
    (dict(warmup=50, steps=50), "warm-up"),
    (dict(drop_label=1.0), "drop_label"),
    (dict(bf16=True), "needs --device cuda"),
    (dict(device="tpu"), "device must be"),
])
def test_bad_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**changes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU exists")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no GPU"):
        TrainSettings(device="cuda")


# ---- training runs --------------------------------------------------------------------------------

def test_a_few_dozen_steps_lower_the_loss_and_the_checkpoint_reloads_strictly(tmp_path):
    s = TrainSettings(steps=40, noise_std=0.2, **TINY)
    result = train(s, tmp_path)
    assert result.checkpoint.name == "digits_model_2_64_2_1_0.20.pth" and result.step == 40
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < first - 0.3, (first, last)
    state = torch.load(result.checkpoint, weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values())
    model = load_checkpoint(result.checkpoint)
    assert model.config == TarFlowConfig(image_size=8, patch_size=2, channels=1, width=64, blocks=2, layers=1,
                                         num_classes=10, head_dim=64, noise_std=0.2)
    # held-out images: below the loss of the initial (identity) flow, z = x and logdet = 0
    x = to_model_range(load_digits_split("test")[0][:64])
    with torch.no_grad():
        assert model.loss(x).item() < 0.5 * (x ** 2).mean().item() - 0.3


def test_train_refuses_to_overwrite_and_resume_needs_matching_settings(tmp_path):
    s = TrainSettings(steps=4, **{**TINY, "warmup": 1})
    train(s, tmp_path)
    with pytest.raises(FileExistsError, match="exists; resume it"):
        train(s, tmp_path)
    with pytest.raises(ValueError, match="lr was 0.002, now 0.001"):
        train(replace(s, lr=1e-3), tmp_path, resume=True)
    train(s, tmp_path, force=True)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(s, tmp_path / "empty", resume=True)


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    s = TrainSettings(steps=12, **{**TINY, "warmup": 3})
    whole = train(s, tmp_path / "whole")
    half = train(s, tmp_path / "split", stop_after=5)
    assert half.step == 5
    rest = train(s, tmp_path / "split", resume=True)
    assert rest.step == 12 and rest.losses == whole.losses
    a, b = torch.load(whole.checkpoint), torch.load(rest.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = torch.load(resume_path(whole.checkpoint)), torch.load(resume_path(rest.checkpoint))
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"] == 12
    assert sa["scheduler"]["_last_lr"] == sb["scheduler"]["_last_lr"]


def test_training_on_a_grey_folder_with_flips(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("left", "right"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for k in range(6):
            write_image(tmp_path / "data" / name / f"{k}.png", rng.integers(0, 256, (12, 10), dtype=np.uint8))
    s = TrainSettings(data=str(tmp_path / "data"), image_size=4, channels=1, steps=3,
                      **{**TINY, "warmup": 1, "batch_size": 4}, flip=True)
    result = train(s, tmp_path / "out")
    assert result.checkpoint.name == "data_model_2_64_2_1_0.10.pth"
    cfg = load_checkpoint(result.checkpoint).config
    assert (cfg.image_size, cfg.channels, cfg.num_classes) == (4, 1, 2)


# ---- likelihood evaluation and the Bayes classifier ---------------------------------------------------

def reference_bits_per_dim(params, cfg, x, y):
    """float64 NumPy model; bits/dim (book/checkpoints.md, "Bits per dimension") written out."""
    z, logdet = np_model.forward(params, cfg, x, y)
    nll = 0.5 * (z ** 2).mean(axis=(1, 2)) + 0.5 * math.log(2 * math.pi) - logdet + math.log(128)
    return nll / math.log(2)


def digits_model(seed=0):
    cfg = TarFlowConfig(image_size=8, patch_size=2, channels=1, width=64, blocks=2, layers=1,
                        num_classes=10, head_dim=64, noise_std=0.1)
    return make_model(cfg, seed=seed, dtype=torch.float32, out_scale=0.5)


def test_evaluate_bpd_matches_the_float64_numpy_model():
    model, _ = digits_model()
    params = to_numpy(model)
    images, labels = load_digits_split("test")
    images, labels = images[:40], labels[:40]
    got = evaluate_bpd(model, images, labels, batch_size=16, seed=5)
    rng = np.random.default_rng(5)
    x = np.concatenate([((images[s:s + 16] + rng.uniform(size=images[s:s + 16].shape)) / 256 * 2 - 1)
                        for s in range(0, 40, 16)])
    want = reference_bits_per_dim(params, model.config, x, labels).mean()
    assert got == pytest.approx(want, rel=1e-5)
    unlabelled = evaluate_bpd(model, images, None, batch_size=16, seed=5)
    assert unlabelled == pytest.approx(reference_bits_per_dim(params, model.config, x, None).mean(), rel=1e-5)
    assert abs(unlabelled - got) > 1e-4                                       # the labels matter


def test_bayes_posterior_is_the_softmax_of_total_log_likelihoods():
    model, params = digits_model(seed=1)
    cfg = model.config
    x = to_model_range(load_digits_split("test")[0][:6])
    loglik = class_log_likelihoods(model, x, batch_size=4)
    assert loglik.shape == (6, 10)
    N = cfg.tokens * cfg.token_dim
    for k in range(10):
        z, logdet = np_model.forward(params, cfg, x.double().numpy(), np.full(6, k))
        total = -N * (0.5 * (z ** 2).mean(axis=(1, 2)) + 0.5 * math.log(2 * math.pi) - logdet)
        np.testing.assert_allclose(loglik[:, k].numpy(), total, rtol=1e-5)
    post = log_posterior(loglik)
    np.testing.assert_allclose(post.exp().sum(1).numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose((post[:, 3] - post[:, 7]).numpy(), (loglik[:, 3] - loglik[:, 7]).numpy(), rtol=1e-9)
    only_nine = torch.tensor([-math.inf] * 9 + [0.0], dtype=torch.float64)   # log p(y): all mass on 9
    assert torch.all(classify(model, x, log_prior=only_nine) == 9)


def test_bayes_needs_a_conditional_model():
    cfg = TarFlowConfig(image_size=4, patch_size=2, channels=1, width=64, blocks=1, layers=1, head_dim=64)
    model, _ = make_model(cfg, dtype=torch.float32)
    with pytest.raises(ValueError, match="unconditional"):
        class_log_likelihoods(model, torch.zeros(2, 1, 4, 4))
