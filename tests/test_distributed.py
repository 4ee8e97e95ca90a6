"""Several processes under torchrun (torch_backend/distributed.py): two CPU ranks on gloo over
loopback, started as `python -m torch.distributed.run --standalone --nproc-per-node=2 -m
tarflow_ref ...`, against one process with the same flags.

    sample    the same images, bit for bit (the noise of batch k is the k-th draw of one stream)
    fid       the same feature sums up to float64 rounding, the same FID; a run stopped on two
              ranks finishes on one with the same sums
    train     the same weights after two steps of the same global batch, after a run stopped on
              two ranks is resumed on one (and one on two), up to float32 rounding
              (WEIGHTS_RTOL); a two-rank run killed with SIGKILL and resumed ends bit for bit as an
              uninterrupted two-rank run
    failure   one rank raising ends the whole job with its error within FAIL_SECONDS

Each torchrun costs seconds of start-up (two interpreters that import torch); the models are
the bundled digits model and a small digits training run.
"""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tarflow_ref.cli import main

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_RTOL = 1e-5      # max |w_2 - w_1| / max |w_1| per tensor: float32 gradients summed in another order
FAIL_SECONDS = 120       # a failed job ends well within this (a hang would run into the 30-minute TIMEOUT)
TRAIN = ["train", "--steps", "4", "--warmup", "1", "--batch-size", "16", "--blocks", "2", "--threads", "1",
         "--save-minutes", "0"]


def start_torchrun(*args, script=("-m", "tarflow_ref")):
    """torchrun with two ranks, started in the background."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             *script, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun starts its ranks in sessions of their own, so killing
    torchrun's process group does not reach them)."""
    try:
        children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
    except OSError:
        return []
    return children + [d for c in children for d in descendants(c)]


def kill_all(proc):
    """SIGKILL to torchrun and every process it started; returns once they are gone."""
    pids = descendants(proc.pid)
    for pid in [proc.pid, *pids]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
              for pid in pids if Path(f"/proc/{pid}/status").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)


def torchrun(*args, script=("-m", "tarflow_ref"), timeout=300):
    """torchrun with two ranks; on a timeout it and its ranks are killed."""
    proc = start_torchrun(*args, script=script)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ok(done):
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_two_ranks_sample_the_images_of_one_process(tmp_path):
    flags = ["sample", "--num-images", 10, "--batch-size", 3, "--seed", 4, "--threads", 1]   # 4 batches, the last of 1
    main([*map(str, flags), "--out", str(tmp_path / "one.png"), "--npy", str(tmp_path / "one.npy")])
    out = ok(torchrun(*flags, "--out", tmp_path / "two.png", "--npy", tmp_path / "two.npy"))
    assert out.count("wrote") == 1                                        # rank 0 alone prints
    one, two = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert two.shape == (10, 1, 8, 8) and np.array_equal(one, two)
    assert len(list(tmp_path.iterdir())) == 4                             # rank 0 alone writes


def test_torchrun_claims_the_short_flag_so_commands_take_num_images(tmp_path):
    done = torchrun("sample", "--n", 2, "--out", tmp_path / "s.png")
    assert done.returncode != 0 and "ambiguous option: --n" in done.stderr


def fid_state(path):
    saved = torch.load(path, weights_only=True)
    return {k: saved[k].numpy() for k in ("features_sum", "features_cov_sum", "features_num_samples")}


def test_two_ranks_give_the_fid_statistics_of_one_process(tmp_path, capsys):
    flags = ["fid", "--num-images", 20, "--batch-size", 4, "--seed", 2, "--threads", 1]    # 5 batches
    main([*map(str, flags), "--state", str(tmp_path / "one.pt")])
    printed = capsys.readouterr().out
    out = ok(torchrun(*flags, "--state", tmp_path / "two.pt"))
    one, two = fid_state(tmp_path / "one.pt"), fid_state(tmp_path / "two.pt")
    assert int(two["features_num_samples"]) == 20
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-12, atol=1e-12 * np.abs(one[k]).max())
    fid_lines = [line.split("; sampling")[0] for line in (printed + out).splitlines() if line.startswith("FID ")]
    assert len(fid_lines) == 2 and fid_lines[0] == fid_lines[1] and "(20 images" in fid_lines[0], fid_lines

    # stopped on two ranks after one round (batches 0 and 1), finished by one process
    ok(torchrun(*flags, "--state", tmp_path / "half.pt", "--stop-after", 1))
    assert int(fid_state(tmp_path / "half.pt")["features_num_samples"]) == 8
    main([*map(str, flags), "--state", str(tmp_path / "half.pt")])
    half = fid_state(tmp_path / "half.pt")
    for k in one:
        np.testing.assert_allclose(half[k], one[k], rtol=1e-12, atol=1e-12 * np.abs(one[k]).max())


def weights(folder):
    (path,) = Path(folder).glob("*.pth")
    return torch.load(path, weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            scale = a[k].abs().max().clamp_min(1e-30)
            assert ((a[k] - b[k]).abs().max() / scale).item() <= WEIGHTS_RTOL, k


def test_two_ranks_train_and_resume_as_one_process(tmp_path):
    one, one_half, two, two_one, one_two = (tmp_path / name for name in ("one", "one_half", "two", "two_one",
                                                                          "one_two"))
    main([*TRAIN, "--out-dir", str(one), "--stop-after", "2"])
    shutil.copytree(one, one_half)
    main([*TRAIN, "--out-dir", str(one), "--resume"])
    after_2, after_4 = weights(one_half), weights(one)

    ok(torchrun(*TRAIN, "--out-dir", two, "--stop-after", 2))          # the same global batch of 16, 8 a rank
    assert_same_weights(after_2, weights(two))
    shutil.copytree(two, two_one)
    main([*TRAIN, "--out-dir", str(two_one), "--resume"])               # stopped on two ranks, resumed on one
    assert_same_weights(after_4, weights(two_one))
    shutil.copytree(one_half, one_two)
    ok(torchrun(*TRAIN, "--out-dir", one_two, "--resume"))             # stopped on one, resumed on two
    assert_same_weights(after_4, weights(one_two))
    assert not after_4["blocks.0.proj_out.weight"].equal(after_2["blocks.0.proj_out.weight"])   # steps 3, 4 count


def test_a_killed_two_rank_training_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL to torchrun and both ranks once the first checkpoint is on disk (mid-run), then
    --resume on two ranks: bit for bit the weights of two ranks that ran every step without a stop
    (two gloo ranks add their gradients in one order)."""
    flags = [*TRAIN, "--steps", "60", "--save-every", "1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    ok(torchrun(*flags, "--out-dir", whole))
    proc = start_torchrun(*flags, "--out-dir", killed)
    deadline = time.monotonic() + 300
    while not list(killed.glob("*.pth")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_all(proc)
    (resume,) = killed.glob("*.resume*")
    assert torch.load(resume, weights_only=True)["step"] < 60, "the run ended before it could be killed"
    ok(torchrun(*flags, "--out-dir", killed, "--resume"))
    expected, resumed = weights(whole), weights(killed)
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path):
    done = torchrun("train", "--batch-size", 15, "--out-dir", tmp_path)
    assert done.returncode != 0 and "the batch size 15 must be a multiple of the number of processes 2" in done.stderr


def test_a_command_that_cannot_split_its_work_refuses_to_run_under_torchrun(tmp_path):
    done = torchrun("trace", "--num-images", 1, "--out", tmp_path / "t.png")
    assert done.returncode != 0 and "trace runs as one process; start it without torchrun" in done.stderr
    assert not (tmp_path / "t.png").exists()


def test_one_rank_failing_ends_the_job_with_its_error(tmp_path):
    start = time.monotonic()
    done = torchrun(*TRAIN, "--out-dir", tmp_path, script=[str(ROOT / "tests" / "distributed_failure.py")],
                    timeout=FAIL_SECONDS)
    assert time.monotonic() - start < FAIL_SECONDS
    assert done.returncode != 0 and "rank 1 failed on purpose at step 1" in done.stderr
