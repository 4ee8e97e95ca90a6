"""The command line end to end: each subcommand in a subprocess (`sys.executable -m tarflow_ref`),
bad input in-process through `cli.main` (the same code path, without paying a torch import each).

Every bad value must stop before any work with exactly one line on stderr and exit code 2.
"""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image
from sklearn.linear_model import LogisticRegression

from tarflow_ref import TarFlow, TarFlowConfig, load_checkpoint, sample
from tarflow_ref.assets import bundled_checkpoint
from tarflow_ref.cli import main
from tarflow_ref.cli.common import save_grid
from tarflow_ref.io.checkpoint import save_model
from tarflow_ref.torch_backend.model import randomize_
from tarflow_ref.training.data import load_digits_split, load_image_folder, to_model_range
from tarflow_ref.training.train import evaluate_bpd

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tarflow_ref", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_readme_command_1_samples_digits_in_under_30_seconds(tmp_path):
    start = time.perf_counter()
    done = run("sample", "--out", "samples.png", cwd=tmp_path)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert seconds < 30, seconds
    assert done.stdout.strip() == "wrote samples.png (20 images, classes 0..9)"
    png = np.asarray(Image.open(tmp_path / "samples.png"))
    assert png.shape == (2 * 10 * 7, 10 * 10 * 7)                        # 2 rows x 10 classes, 10 px x 7
    # read the 20 digits back from the PNG (centre of each enlarged pixel, inside the 1-pixel frame)
    cells = rearrange(png[3::7, 3::7], "(r h) (q w) -> (r q) (h w)", h=10, w=10)
    digits = rearrange(cells, "n (h w) -> n h w", h=10)[:, 1:-1, 1:-1].reshape(20, 64) / 255 * 2 - 1
    train_x, train_y = load_digits_split("train")
    judge = LogisticRegression(max_iter=2000).fit(to_model_range(train_x).flatten(1).numpy(), train_y)
    assert (judge.predict(digits) == np.tile(np.arange(10), 2)).mean() >= 0.8


def test_sample_cycles_the_given_classes_and_is_seeded(tmp_path):
    args = ["sample", "--class", "3", "7", "--n", "4", "--cfg", "0", "--no-denoise", "--seed", "5",
            "--out", str(tmp_path / "a.png"), "--npy", str(tmp_path / "a.npy")]
    assert main(args) is None
    again = [a.replace("a.", "b.") for a in args]
    main(again)
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert np.array_equal(a, b)
    png = np.asarray(Image.open(tmp_path / "a.png"))
    assert png.shape == (2 * 70, 2 * 70)                                  # 2 columns: classes 3, 7
    save_grid(a, tmp_path / "again.png", cols=2, scale=7)
    assert np.array_equal(png, np.asarray(Image.open(tmp_path / "again.png")))
    # the same images as the API gives for labels 3, 7, 3, 7 and the seeded noise
    noise = torch.randn(4, 64, 1, generator=torch.Generator().manual_seed(5))
    direct = sample(load_checkpoint(bundled_checkpoint()), noise, torch.tensor([3, 7, 3, 7]))
    np.testing.assert_allclose(a, ((direct.clamp(-1, 1) + 1) / 2).numpy(), atol=1e-6)
    other_seed = [("6" if a_ == "5" else a_) for a_ in args] + ["--force"]      # replacing a.png, a.npy
    main(other_seed)
    assert not np.array_equal(np.load(tmp_path / "a.npy"), b)


def test_trace_shows_noise_every_block_and_the_denoised_image(tmp_path):
    done = run("trace", "--n", "3", "--class", "1", "--out", "trace.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("wrote trace.png (3 rows; columns: noise, block 3, block 2, block 1, "
                                   "block 0, denoised)")
    png = np.asarray(Image.open(tmp_path / "trace.png"))
    assert png.shape == (3 * 70, 6 * 70)


def test_train_then_resume_then_bpd(tmp_path, monkeypatch, capsys):
    common = ["train", "--patch", "2", "--blocks", "2", "--steps", "6", "--warmup", "1", "--batch-size", "16"]
    first = run(*common, "--stop-after", "3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("wrote digits_model_2_64_2_1_0.10.pth after 3 of 6 steps")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:                              # refuses to overwrite
        main(common)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "digits_model_2_64_2_1_0.10.pth exists; resume it (--resume) or start over (--force)" in err
    resumed = run(*common, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "after 6 of 6 steps" in resumed.stdout
    ckpt = tmp_path / "digits_model_2_64_2_1_0.10.pth"
    bpd = run("bpd", "--ckpt", str(ckpt), cwd=tmp_path)
    assert bpd.returncode == 0, bpd.stderr
    images, labels = load_digits_split("test")
    want = evaluate_bpd(load_checkpoint(ckpt), images, labels)
    assert bpd.stdout.strip() == f"bits/dim {want:.4f} (digits test, 360 images, labelled)"


def test_bpd_on_an_image_folder(tmp_path, capsys):
    images, labels = load_digits_split("test")
    for k in range(20):
        folder = tmp_path / "digits" / f"class_{labels[k]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[k, 0]).save(folder / f"{k}.png")
    main(["bpd", "--data", str(tmp_path / "digits"), "--unlabelled"])
    read, read_labels, classes = load_image_folder(tmp_path / "digits", 8, channels=1)
    assert classes == [f"class_{c}" for c in sorted(set(labels[:20]))]
    assert sorted(map(bytes, read)) == sorted(map(bytes, images[:20]))     # the same 20 images, PNG-exact
    want = evaluate_bpd(load_checkpoint(bundled_checkpoint()), read, None)
    assert capsys.readouterr().out.strip() == f"bits/dim {want:.4f} ({tmp_path / 'digits'}, 20 images, unlabelled)"


@pytest.fixture
def unconditional_ckpt(tmp_path):
    cfg = TarFlowConfig(image_size=8, patch_size=2, channels=1, width=64, blocks=1, layers=1, noise_std=0.1)
    path = tmp_path / "toy_model_2_64_1_1_0.10.pth"
    save_model(randomize_(TarFlow(cfg)), path)
    return path


BAD_INPUT = [
    (["sample", "--n", "-3"], "argument --n: must be at least 1, got -3"),
    (["sample", "--class", "12"], "unknown class 12: this model has classes 0..9"),
    (["sample", "--class", "x"], "argument --class: invalid int value: 'x'"),
    (["sample", "--ckpt", "missing.pth"], "checkpoint missing.pth does not exist"),
    (["sample", "--bf16"], "bfloat16 autocast (--bf16) needs --device cuda"),
    (["sample", "--device", "tpu"], "device must be 'cpu' or 'cuda', got 'tpu'"),
    (["sample", "--cfg", "-1"], "guidance weight must be a finite number >= 0, got -1.0"),
    (["sample", "--attn-temp", "0"], "attention temperature must be a finite number > 0, got 0.0"),
    (["sample", "--guide-what", "c"], "argument --guide-what: invalid choice: 'c'"),
    (["sample", "--denoise-factor", "-0.5"], "argument --denoise-factor: must be a finite number >= 0, got -0.5"),
    (["sample", "--strategy", "[0-4-8-2]"], "--strategy needs --sampler gsj"),
    (["sample", "--sampler", "gsj", "--strategy", "nonsense"], "--strategy: unknown strategy preset 'nonsense'"),
    (["sample", "--out", "samples.jpg"], "samples.jpg: the output must be a .png file"),
    (["sample", "--out", "nowhere/samples.png"], "nowhere: no such folder for the output"),
    (["trace", "--threads", "0"], "argument --threads: must be in 1.."),
    (["train", "--width", "96"], "width must be a multiple of 64"),
    (["train", "--patch", "3"], "image size 8 is not divisible by patch size 3"),
    (["train", "--data", "no_such_folder"], "--data no_such_folder: neither 'digits' nor an existing folder"),
    (["train", "--resume"], "cannot resume: digits_model_1_64_4_1_0.10.resume.pt does not exist"),
    (["train", "--resume", "--force"], "argument --force: not allowed with argument --resume"),
    (["bpd", "--split", "valid"], "argument --split: invalid choice: 'valid'"),
    (["bpd", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_stops_with_one_line_and_exit_code_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []                                   # nothing written


def test_unconditional_model_takes_no_class_and_samples_without(unconditional_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["sample", "--ckpt", str(unconditional_ckpt), "--class", "1"])
    assert stop.value.code == 2 and "this model is unconditional: it takes no --class" in capsys.readouterr().err
    main(["sample", "--ckpt", str(unconditional_ckpt), "--n", "5", "--out", str(tmp_path / "u.png")])
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'u.png'} (5 images)"
    assert np.asarray(Image.open(tmp_path / "u.png")).shape == (2 * 70, 3 * 70)      # ceil(sqrt 5) = 3 columns


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU exists")
def test_cuda_without_a_gpu_is_one_line_in_a_subprocess(tmp_path):
    done = run("sample", "--device", "cuda", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("tarflow-ref sample: error: CUDA was requested but no GPU is available; "
                           "use --device cpu (see --help)\n")


def fail_line(argv, capsys) -> str:
    """The one line on stderr with which `tarflow-ref ARGV` stops with exit code 2."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    return err


def test_a_model_with_nan_weights_is_refused_by_every_command(unconditional_ckpt, tmp_path, capsys):
    state = torch.load(unconditional_ckpt, weights_only=True)
    state["blocks.0.attn_blocks.0.mlp.main.0.weight"][3, 5] = float("nan")
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    for argv in (["bpd"], ["sample", "--out", str(tmp_path / "s.png")], ["trace", "--out", str(tmp_path / "t.png")]):
        err = fail_line([*argv, "--ckpt", str(path)], capsys)
        assert ("diverged.pth: the weights hold NaN or infinite values (in "
                "'blocks.0.attn_blocks.0.mlp.main.0.weight'): the model diverged in training; "
                "it cannot be evaluated or sampled") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diverged.pth", unconditional_ckpt.name]


def test_evaluation_never_reports_a_nan_figure(unconditional_ckpt):
    images = load_digits_split("test")[0][:8]
    model = load_checkpoint(unconditional_ckpt)
    with torch.no_grad():
        model.blocks[0].proj_in.bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"the weights hold NaN or infinite values \(in 'blocks.0.proj_in.bias'\)"):
        evaluate_bpd(model, images)
    overflowing = randomize_(TarFlow(model.config), out_scale=3000.0)   # finite weights, exp(-a) overflows
    with pytest.raises(ValueError, match="bits/dim came out inf: the model overflows on these images"):
        evaluate_bpd(overflowing, images)


def test_a_renamed_checkpoint_cannot_change_sigma_or_pass_for_another_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name, problem in (("digits_model_1_64_4_1_0.90.pth", "the file name says sigma 0.90, but the model was "
                                                             "trained with sigma 0.10"),
                          ("imagenet_model_2_768_8_8_0.05.pth", "the file name says patch size 2, width 768")):
        copy = tmp_path / name
        copy.write_bytes(bundled_checkpoint().read_bytes())
        for command in ("sample", "bpd"):
            assert problem in fail_line([command, "--ckpt", str(copy)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["digits_model_1_64_4_1_0.90.pth",
                                                                 "imagenet_model_2_768_8_8_0.05.pth"])


def test_a_missing_optional_package_names_the_extra_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)          # as if scikit-learn were not installed
    for argv in (["bpd"], ["train", "--steps", "2", "--warmup", "1"]):
        assert fail_line(argv, capsys) == (f"tarflow-ref {argv[0]}: error: the digits data set needs the optional "
                                           f"package scikit-learn: pip install 'tarflow_ref[digits]' (see --help)\n")
    assert list(tmp_path.iterdir()) == []
