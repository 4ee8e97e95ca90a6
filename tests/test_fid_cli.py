"""The `fid` and `fid-stats` commands: the same images as `sample`, resumed runs (stopped on purpose
and killed), statistics files from real images, and one clear line for each bad input."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tarflow_ref.assets import bundled_fid_stats
from tarflow_ref.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def fid_of(out: str) -> str:
    """The FID as printed, from the command's output."""
    return re.search(r"^FID (\S+)  \(", out, re.MULTILINE).group(1)


def test_fid_scores_exactly_the_images_sample_draws(tmp_path, capsys):
    common = ["--n", "20", "--seed", "5", "--cfg", "0.5", "--threads", "1"]
    main(["sample", *common, "--out", str(tmp_path / "a.png"), "--npy", str(tmp_path / "a.npy")])
    main(["fid", *common])
    sampled = capsys.readouterr().out
    assert "sampler: seq; 252 sequential steps per batch" in sampled
    assert re.search(r"\(20 images against digits: 360 images; sampling \d+\.\d s, \d+\.\d images/s\)", sampled)
    main(["fid", "--images", str(tmp_path / "a.npy"), "--stats", str(bundled_fid_stats())])
    read = capsys.readouterr().out
    assert "images read" in read
    assert fid_of(read) == fid_of(sampled)


def test_a_stopped_run_continues_to_the_same_fid(tmp_path, capsys):
    common = ["fid", "--n", "24", "--batch-size", "8", "--no-denoise", "--threads", "1"]
    main(common)
    whole = fid_of(capsys.readouterr().out)
    state = tmp_path / "run.pt"
    main([*common, "--state", str(state), "--stop-after", "1"])
    assert "stopped after 8 of 24 images; the run is saved in" in capsys.readouterr().out
    main([*common, "--state", str(state)])
    assert fid_of(capsys.readouterr().out) == whole
    with pytest.raises(SystemExit):
        main([*common, "--cfg", "2", "--state", str(state)])
    assert "belongs to a run with other settings (cfg: 1.0 there, 2.0 now)" in capsys.readouterr().err


def test_a_killed_run_continues_to_the_same_fid(tmp_path, capsys):
    """SIGKILL while sampling (the state is saved after every batch), then the same command again."""
    args = ["fid", "--n", "40", "--batch-size", "8", "--cfg", "0", "--no-denoise", "--save-every", "1",
            "--state", str(tmp_path / "run.pt")]
    command = [sys.executable, "-m", "tarflow_ref", *args]
    proc = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (tmp_path / "run.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    assert 0 < int(saved["features_num_samples"]) < 40, "the run finished before it could be killed"
    resumed = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    main(args[:-2])                                                    # uninterrupted, no state
    assert fid_of(resumed.stdout) == fid_of(capsys.readouterr().out)


def test_gsj_auto_reports_its_strategy_and_fewer_steps(capsys):
    main(["fid", "--n", "8", "--sampler", "gsj", "--threads", "1", "--no-denoise"])
    out = capsys.readouterr().out
    steps = int(re.search(r"sampler: gsj G=\[.*\] J=\[.*\] guess=\[.*\]; (\d+) sequential steps per batch", out)[1])
    assert steps < 252 and "strategy search" in out


def test_fid_stats_of_the_held_out_digits_reproduce_the_bundled_file(tmp_path, capsys):
    out = tmp_path / "digits_test.pth"
    main(["fid-stats", "--data", "digits", "--split", "test", "--out", str(out), "--batch-size", "50"])
    assert capsys.readouterr().out.strip() == f"wrote {out} (360 images, 64 features)"
    mine, bundled = torch.load(out, weights_only=True), torch.load(bundled_fid_stats(), weights_only=True)
    assert set(mine) == set(bundled)
    assert int(mine["real_features_num_samples"]) == 360
    # other batch sizes, threads or CPUs change the float32 features' last bits, not more
    for k in ("real_features_sum", "real_features_cov_sum"):
        np.testing.assert_allclose(mine[k], bundled[k], rtol=1e-6, atol=1e-6 * float(bundled[k].abs().max()))
    for k in bundled:
        if k.startswith("digit_features."):
            assert torch.equal(mine[k], bundled[k]), k
    with pytest.raises(SystemExit):
        main(["fid-stats", "--data", "digits", "--out", str(out)])
    assert "exists; pass --force to replace it" in capsys.readouterr().err


def test_fid_stats_of_a_folder(tmp_path, capsys):
    from PIL import Image

    from tarflow_ref.training.data import load_digits_split

    images, _ = load_digits_split("train")
    (tmp_path / "real").mkdir()
    for i, img in enumerate(images[:50]):
        Image.fromarray(img[0]).save(tmp_path / "real" / f"{i:02d}.png")
    out = tmp_path / "mine.pth"
    main(["fid-stats", "--data", str(tmp_path / "real"), "--features", "digits", "--out", str(out)])
    capsys.readouterr()
    main(["fid", "--images", str(tmp_path / "real"), "--stats", str(out)])
    assert abs(float(fid_of(capsys.readouterr().out))) < 1e-6


@pytest.mark.parametrize("args, message", [
    (["fid", "--stop-after", "1"], "--stop-after needs --state (where the stopped run is saved)"),
    (["fid", "--save-every", "0"], "--save-every: must be at least 1, got 0"),
    (["fid", "--images", "x.npy", "--ckpt", "y.pth"], "--images and --ckpt exclude each other"),
    (["fid", "--published"], "--published: no published setting for this checkpoint (published: afhq256, "),
    (["fid", "--ckpt", "afhq256", "--published", "--cfg", "2"],
     "--published sets --cfg, --attn-temp, --denoise-factor"),
    (["fid", "--strategy", "auto"], "--strategy needs --sampler gsj"),
    (["fid", "--stats", "nothing.pth"], "nothing.pth: no such file, and not a released name"),
    (["fid", "--images", "x.npy"], "--stats is needed"),
    (["fid", "--images", "x.npy", "--stats", "digits"], "x.npy: no such folder or file of images"),
    (["fid", "--cfg", "-1"], "guidance weight must be a finite number >= 0"),
    (["fid-stats", "--data", "somewhere", "--out", "s.pth"], "--features is needed"),
    (["fid-stats", "--data", "digits", "--out", "s.txt"], "s.txt: the output must be a .pth file"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TARFLOW_REF_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["fid", "--images", "x.npy", "--stats", "digits"],
                                     ["fid-stats", "--data", "digits", "--out", "s.pth"]], ids=["fid", "fid-stats"])
def test_cuda_without_a_gpu_is_one_line(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([*command, "--device", "cuda"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "CUDA was requested but no GPU is available" in err
