"""The command line refuses what cannot work before any work, with one line on stderr and exit code
2: flags out of range (seeds that torch cannot take, thread counts that crash it), requests that
need more memory than the machine has (cli/memory.py), models that sample NaN. In-process through
`cli.main`, with the work itself replaced by a function that fails the test if it is reached; one
subprocess for the thread count that used to crash the interpreter.
"""
import math
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from tarflow_ref import TarFlow, TarFlowConfig
from tarflow_ref.cli import main
from tarflow_ref.cli.common import save_grid
from tarflow_ref.io.checkpoint import save_model
from tarflow_ref.params import BUFFERS, shapes
from tarflow_ref.torch_backend.model import randomize_

GB = 10 ** 9
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Any sampling or training fails the test: a refusal must come before it. Runs in tmp_path."""
    def started(*args, **kwargs):
        raise AssertionError("the work started instead of the request being refused")
    monkeypatch.setattr("tarflow_ref.cli.sample.draw_images", started)
    monkeypatch.setattr("tarflow_ref.torch_backend.sampling.sample", started)
    monkeypatch.setattr("tarflow_ref.training.train.train", started)
    monkeypatch.setattr("tarflow_ref.training.train.evaluate_bpd", started)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(argv, capsys, folder) -> str:
    """The one line on stderr with which `tarflow-ref ARGV` stops with exit code 2, writing nothing."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert list(folder.iterdir()) == []
    return err


BAD_FLAGS = [
    (["sample", "--seed", str(2 ** 70)], "argument --seed: must be in 0..4294967295, got 1180591620717411303424"),
    (["sample", "--seed", "-1"], "argument --seed: must be in 0..4294967295, got -1"),
    (["trace", "--seed", str(2 ** 32)], "argument --seed: must be in 0..4294967295, got 4294967296"),
    (["bpd", "--seed", "-1"], "argument --seed: must be in 0..4294967295, got -1"),
    (["train", "--seed", str(2 ** 70)], "argument --seed: must be in 0..4294967295, got 1180591620717411303424"),
    (["sample", "--scale", "0"], "argument --scale: must be at least 1, got 0"),
    (["sample", "--cols", "-2"], "argument --cols: must be at least 1, got -2"),
    (["trace", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["sample", "--denoise-factor", "nan"], "argument --denoise-factor: must be a finite number, got 'nan'"),
    (["train", "--stop-after", "0"], "argument --stop-after: must be at least 1, got 0"),
    (["train", "--save-every", "0"], "argument --save-every: must be at least 1, got 0"),
    (["train", "--save-minutes", "-1"], "argument --save-minutes: must be a finite number >= 0, got -1"),
    (["assignments", "grade", "x.ipynb", "--timeout", "0"], "argument --timeout: must be at least 1, got 0"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_flag_out_of_range_is_refused_before_anything_is_loaded(argv, message, no_work, capsys):
    assert message in refused(argv, capsys, no_work)


@pytest.mark.parametrize("command", ["trace", "train"])
def test_thousands_of_threads_are_refused_in_a_fresh_interpreter(command, tmp_path):
    """torch.set_num_threads(100000) crashed the interpreter (a segmentation fault) at the first
    parallel kernel: a subprocess, so that a regression fails this test and not the whole run;
    its address space is capped so that such a crash stays small."""
    def limit():
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = 16 * GB if hard == resource.RLIM_INFINITY else min(16 * GB, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    done = subprocess.run([sys.executable, "-m", "tarflow_ref", command, "--threads", "100000"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr == (f"tarflow-ref {command}: error: argument --threads: must be in 1..{CPUS} (the CPUs this "
                           "process may use), got 100000 (see --help)\n")
    assert list(tmp_path.iterdir()) == []


def test_a_request_larger_than_the_memory_names_both_figures(no_work, capsys, monkeypatch):
    """The figures are the documented estimate (cli/memory.py) of the bundled model (1 x 8 x 8
    digits, width 64, 1 layer, guided): --n 10^9 images in float32, three copies: 768 GB; the grid
    of 10^9 cells of 10 x 10 pixels at the default scale 7: 2.6 TB at one byte per grey pixel in
    float64 thrice plus 8 bits and PIL's byte, 4.9 TB enlarged; the caches of a batch of 64, two
    branches: 4.2 MB."""
    monkeypatch.setattr("tarflow_ref.cli.memory.available_bytes", lambda device="cpu": 8 * GB)
    err = refused(["sample", "--n", str(10 ** 9)], capsys, no_work)
    assert err == ("tarflow-ref sample: error: this request needs about 8.3 TB of memory (images 768 GB, PNG grid "
                   "7.5 TB, caches 4.2 MB), but 8.0 GB are available; ask for fewer or smaller images (--n, --scale, "
                   "--batch-size) (see --help)\n")
    err = refused(["sample", "--scale", "100000"], capsys, no_work)     # 20 cells of 10^12 enlarged pixels
    assert "this request needs about 20 TB of memory (images 15 kB, PNG grid 20 TB, caches 1.3 MB)" in err


LARGE = [
    ["sample", "--n", str(10 ** 9)],
    ["sample", "--scale", "100000"],
    ["sample", "--n", "2", "--scale", "1000000", "--npy", "x.npy"],
    ["trace", "--scale", "100000"],
    ["trace", "--n", str(10 ** 10)],
    ["train", "--batch-size", str(10 ** 9)],
    ["train", "--width", str(64 * 2 ** 14)],
    ["train", "--blocks", str(10 ** 6), "--layers", "1000"],
]


@pytest.mark.parametrize("argv", LARGE, ids=[" ".join(a) for a in LARGE])
def test_requests_that_cannot_fit_this_machine_are_refused(argv, no_work, capsys):
    """The real machine's memory (no machine of today has a petabyte)."""
    err = refused(argv, capsys, no_work)
    assert f"tarflow-ref {argv[0]}: error: this request needs about " in err and " are available; " in err


def test_the_memory_estimates_are_lower_bounds_of_what_is_allocated(tmp_path):
    """memory.py counts at most what the code allocates: the activations training keeps for the
    backward pass (every tensor autograd saves, less the weights), the NumPy arrays of the PNG
    grid (tracemalloc), and the parameters (params.py's shapes)."""
    from tarflow_ref.cli import memory

    for cfg, batch in ((TarFlowConfig(image_size=8, patch_size=1, channels=1, width=64, blocks=4, layers=1,
                                      num_classes=10), 64),
                       (TarFlowConfig(image_size=16, patch_size=2, channels=3, width=128, blocks=2, layers=3), 8)):
        model = randomize_(TarFlow(cfg))
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def keep(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model.loss(torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size))
        needs = memory.training_needs(cfg, batch)
        assert needs["activations"] <= sum(saved.values()) <= 3 * needs["activations"]
        parameters = sum(math.prod(s) for k, s in shapes(cfg).items() if not k.endswith(BUFFERS))
        assert memory.parameter_count(cfg) == parameters == sum(p.numel() for p in model.parameters())
        assert needs["weights, gradients and optimiser"] == 16 * parameters

        frames, cols, scale = 600, 25, 2
        pixels = np.random.default_rng(0).random((frames, cfg.channels, cfg.image_size, cfg.image_size))
        tracemalloc.start()
        save_grid(pixels, tmp_path / "grid.png", cols, scale)
        numpy_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        grid, _ = memory.grid_bytes(cfg, frames, cols, scale)
        assert grid <= numpy_peak <= 2 * grid


def test_the_available_memory_is_a_real_figure():
    from tarflow_ref.cli import memory

    available = memory.available_bytes()
    assert available is None or 0 < available < 1 << 60
    assert memory.size_text(999) == "999 B" and memory.size_text(12_345) == "12 kB"
    assert memory.size_text(8_268_000_000_000) == "8.3 TB"
    assert memory.size_text(768 * GB) == "768 GB" and memory.size_text(2 * 10 ** 16) == "20 PB"


@pytest.fixture
def overflowing(tmp_path):
    """A checkpoint with finite weights whose inverse overflows on any noise: samples are NaN."""
    cfg = TarFlowConfig(image_size=8, patch_size=2, channels=1, width=64, blocks=1, layers=1, noise_std=0.1)
    path = tmp_path / "models" / "toy_model_2_64_1_1_0.10.pth"
    path.parent.mkdir()
    save_model(randomize_(TarFlow(cfg), out_scale=30.0), path)
    out = tmp_path / "out"
    out.mkdir()
    return path, out


def test_a_model_that_samples_nan_writes_nothing_and_says_why(overflowing, capsys):
    path, out = overflowing
    err = refused(["trace", "--ckpt", str(path), "--out", str(out / "t.png")], capsys, out)
    assert ("tarflow-ref trace: error: the trace came out NaN: the model overflows on this noise (are its "
            "weights trained?); nothing written (see --help)\n") in err
    err = refused(["sample", "--ckpt", str(path), "--out", str(out / "s.png"), "--npy", str(out / "s.npy"),
                   "--cfg", "1", "--n", "3"], capsys, out)
    assert ("tarflow-ref sample: error: 10 batches in a row came out NaN: the model overflows at this guidance "
            "weight; try a lower --cfg; nothing written (see --help)\n") in err


def test_a_model_that_samples_finite_images_but_denoises_to_nan_is_redrawn_then_refused(overflowing, capsys,
                                                                                         monkeypatch):
    path, out = overflowing
    monkeypatch.setattr("tarflow_ref.torch_backend.sampling.sample", lambda model, noise, *a, **k: torch.zeros(
        len(noise), 1, 8, 8))
    monkeypatch.setattr("tarflow_ref.torch_backend.denoising.denoise", lambda model, x, *a, **k: x * math.nan)
    err = refused(["sample", "--ckpt", str(path), "--out", str(out / "s.png"), "--n", "2"], capsys, out)
    assert "10 batches in a row came out NaN" in err


def test_a_cuda_device_that_does_not_exist_is_named(monkeypatch, no_work, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ("cuda:7", "cuda:x"):
        err = refused(["sample", "--device", device], capsys, no_work)
        assert f"device '{device}' does not exist: this machine has GPUs cuda:0..cuda:0" in err


def test_a_grid_that_fits_is_drawn_as_before(tmp_path, capsys):
    """The refusals above leave a normal request alone (and the PNG is the size the estimate assumed)."""
    main(["sample", "--n", "3", "--scale", "2", "--no-denoise", "--out", str(tmp_path / "s.png")])
    assert np.asarray(Image.open(tmp_path / "s.png")).shape == (20, 3 * 20)
