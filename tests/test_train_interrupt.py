"""Training survives interruption (train.py, train_state.py).

A run killed with SIGKILL at any moment, inside a checkpoint write included, resumes to weights
(and a checkpoint file) bit-identical to an uninterrupted run, losing at most the step in progress
(checkpoints every step here); SIGINT / SIGTERM stop after a step with a checkpoint; a second run
into the same folder is refused while the first holds it; a .pth that training did not write is
never overwritten; a non-writable folder fails before any work; a non-finite loss names the step
and the learning rate and leaves no NaN checkpoint.

Each run is a child process forked from a forkserver that imported torch, its compiler stack
(which the optimiser imports on first use) and this module once: a fresh interpreter costs
seconds per start. A child reports over a pipe the start and the end of each step, and stops to
be killed at a chosen moment of a checkpoint write: after torch.save of a temporary file (then
cut to half its length, as if the write itself were killed), or before or after a rename.
"""
import multiprocessing
import os
import random
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tarflow_ref.cli import main
from tarflow_ref.io.checkpoint import save_model
from tarflow_ref.torch_backend.model import TarFlow, randomize_
from tarflow_ref.training.train import TrainingDiverged, TrainSettings, train
from tarflow_ref.training.train_state import LOCK_NAME, OutDirBusy, resume_path

SETTINGS = TrainSettings(patch_size=2, width=64, blocks=2, layers=1, batch_size=8, steps=64, warmup=3, lr=2e-3)
# where a checkpoint write can be killed; after the resume file's rename the pair on disk differs
MOMENTS = [("written", ".pth"), ("written", ".resume.pt"), ("before-rename", ".resume.pt"),
           ("after-rename", ".resume.pt"), ("after-rename", ".pth")]
PAUSED = 60                                                        # seconds a paused child waits to be killed


def child(out_dir, settings, pause_at, conn):
    """Train in `out_dir` (resuming when a resume file is there) with a checkpoint every step.

    pause_at: None, or (moment, suffix, n): at the n-th time this process reaches `moment` of the
    file ending in `suffix`, report ('paused', ...) and wait to be killed.
    """
    torch.set_num_threads(1)
    reached = {}
    real_save, real_replace = torch.save, os.replace

    def moment(what, path):
        suffix = ".resume.pt" if str(path).endswith(".resume.pt") else ".pth"
        reached[what, suffix] = reached.get((what, suffix), 0) + 1
        if pause_at == (what, suffix, reached[what, suffix]):
            if what == "written":
                os.truncate(path, os.path.getsize(path) // 2)
            conn.send(("paused", what, suffix))
            time.sleep(PAUSED)

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        moment("written", f)

    def rename(src, dst):
        moment("before-rename", dst)
        real_replace(src, dst)
        moment("after-rename", dst)

    torch.save, os.replace = save, rename
    path = Path(out_dir) / settings.file_name
    result = train(settings, out_dir, resume=resume_path(path).exists(), progress=reporter(conn), save_every=1,
                   save_minutes=None)
    conn.send(("done", result.step, result.interrupted))


def reporter(conn):
    """A `progress` wrapper that reports the start and the end of each step."""
    def steps(indices):
        for step in indices:
            conn.send(("start", step))
            yield step
            conn.send(("end", step))            # after the step's checkpoint
    return steps


def command_line_child(argv, stdout, conn):
    """`tarflow-ref ARGV` (cli.main) with stdout to a file, its progress reported over `conn`."""
    import tarflow_ref.cli.train

    torch.set_num_threads(1)
    tarflow_ref.cli.train.progress = lambda desc, leave=False: reporter(conn)
    sys.stdout = open(stdout, "w")
    try:
        main(argv)
    finally:
        sys.stdout.close()


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([
        "torch._dynamo", "sklearn.datasets", "tarflow_ref.training.train", "tarflow_ref.cli.train", __name__])
    return ctx


def start(ctx, out_dir, settings=SETTINGS, pause_at=None, target=child, args=None):
    mine, theirs = ctx.Pipe()
    process = ctx.Process(target=target, args=(*(args or (str(out_dir), settings, pause_at)), theirs), daemon=True)
    process.start()
    theirs.close()
    return process, mine


def receive(conn, timeout=120):
    """The next message; EOFError when the child has ended and sent everything."""
    if not conn.poll(timeout):
        raise TimeoutError("the training child sent nothing for two minutes")
    return conn.recv()


def drain(conn) -> list:
    messages = []
    while True:
        try:
            if not conn.poll(0):
                return messages
            messages.append(conn.recv())
        except EOFError:
            return messages


def run_to_end(ctx, out_dir, settings=SETTINGS):
    process, conn = start(ctx, out_dir, settings)
    messages = []
    while not messages or messages[-1][0] != "done":
        messages.append(receive(conn))
    process.join()
    return messages[-1]


@pytest.fixture(scope="module")
def uninterrupted(forkserver, tmp_path_factory):
    """A run that nothing interrupted: its checkpoint's bytes, its resume state, and the seconds
    one step with its checkpoint took."""
    out = tmp_path_factory.mktemp("uninterrupted")
    process, conn = start(forkserver, out)
    assert receive(conn) == ("start", 0)
    began = time.perf_counter()
    while (message := receive(conn))[0] != "done":
        pass
    seconds = (time.perf_counter() - began) / SETTINGS.steps
    process.join()
    assert message == ("done", SETTINGS.steps, None)
    path = out / SETTINGS.file_name
    return path.read_bytes(), torch.load(resume_path(path), weights_only=True), seconds


def assert_same_run(out_dir, uninterrupted):
    """out_dir holds exactly the uninterrupted run's checkpoint pair: the same bytes, losses, optimiser."""
    want_bytes, want, _ = uninterrupted
    path = Path(out_dir) / SETTINGS.file_name
    assert sorted(p.name for p in Path(out_dir).iterdir()) == sorted([path.name, resume_path(path).name])
    assert path.read_bytes() == want_bytes                        # weights and metadata, bit for bit
    got = torch.load(resume_path(path), weights_only=True)
    assert got["step"] == want["step"] and got["losses"] == want["losses"]
    assert all(torch.equal(got["model"][k], v) for k, v in want["model"].items())
    for a, b in zip(got["optimizer"]["state"].values(), want["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_sigkill_at_any_moment_resumes_bit_identically(forkserver, uninterrupted, tmp_path):
    rng = random.Random(17)
    step_seconds = uninterrupted[2]
    # every moment of a checkpoint write, at the first and the second write of a process (the
    # first of a resumed one may be the rewrite of the .pth); and random moments: a uniform time
    # within the step after the first or second step started. At most 56 of the 64 steps are used.
    plan = [("moment", (what, suffix, n)) for what, suffix in MOMENTS for n in (1, 2)]
    plan += [("random", (rng.randint(1, 2), rng.uniform(0, step_seconds))) for _ in range(12)]
    rng.shuffle(plan)
    kills, seen_moments, done_steps = 0, set(), 0
    for kind, detail in plan:
        process, conn = start(forkserver, tmp_path, pause_at=detail if kind == "moment" else None)
        messages = [receive(conn)]
        if kind == "moment":
            while messages[-1][0] not in ("paused", "done"):
                messages.append(receive(conn))
        else:
            starts, delay = detail
            while messages[-1][0] != "done" and sum(m[0] == "start" for m in messages) < starts:
                messages.append(receive(conn))
            time.sleep(delay)
        if messages[-1][0] == "done":          # the run ended before the moment came: the plan is too long
            break
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        kills += 1
        messages += drain(conn)
        if messages[-1][0] == "paused":
            seen_moments.add(messages[-1][1:])
        ended = [m[1] for m in messages if m[0] == "end"]
        done_steps = max([done_steps] + [s + 1 for s in ended])
        # nothing lost but the step in progress: the resume file holds every step whose checkpoint completed
        resume = resume_path(tmp_path / SETTINGS.file_name)
        if done_steps:
            assert torch.load(resume, weights_only=True)["step"] >= done_steps
        assert not (tmp_path / SETTINGS.file_name).exists() or resume.exists()
    assert kills >= 20 and seen_moments == set(MOMENTS), (kills, seen_moments)
    assert run_to_end(forkserver, tmp_path) == ("done", SETTINGS.steps, None)
    assert_same_run(tmp_path, uninterrupted)                         # no temporary folder, no lock file left


def test_sigterm_stops_after_the_step_with_a_checkpoint(forkserver, uninterrupted, tmp_path):
    process, conn = start(forkserver, tmp_path)
    while (message := receive(conn)) != ("start", 5):
        pass
    os.kill(process.pid, signal.SIGTERM)
    messages = [message]
    while messages[-1][0] != "done":
        messages.append(receive(conn))
    process.join()
    assert messages[-1] == ("done", 6, "SIGTERM") and process.exitcode == 0
    assert torch.load(resume_path(tmp_path / SETTINGS.file_name), weights_only=True)["step"] == 6
    assert run_to_end(forkserver, tmp_path) == ("done", SETTINGS.steps, None)
    assert_same_run(tmp_path, uninterrupted)


def test_ctrl_c_on_the_command_line_saves_and_says_how_to_continue(forkserver, tmp_path):
    stdout = tmp_path / "stdout.txt"
    out = tmp_path / "run"
    argv = ["train", "--patch", "2", "--blocks", "2", "--steps", "100", "--warmup", "2", "--batch-size", "8",
            "--out-dir", str(out)]
    process, conn = start(forkserver, out, target=command_line_child, args=(argv, str(stdout)))
    while receive(conn) != ("start", 2):
        pass
    os.kill(process.pid, signal.SIGINT)
    process.join()
    assert process.exitcode == 128 + signal.SIGINT
    path = out / "digits_model_2_64_2_1_0.10.pth"
    assert torch.load(resume_path(path), weights_only=True)["step"] == 3
    assert stdout.read_text() == f"stopped by SIGINT after 3 of 100 steps; {path} holds them: continue with --resume\n"
    assert sorted(p.name for p in out.iterdir()) == sorted([path.name, resume_path(path).name])


def test_a_second_run_into_the_same_folder_is_refused(forkserver, tmp_path, capsys):
    process, conn = start(forkserver, tmp_path, pause_at=("written", ".pth", 1))
    while receive(conn)[0] != "paused":
        pass
    for extra in ([], ["--force"], ["--resume"]):
        with pytest.raises(SystemExit) as stop:
            main(["train", "--patch", "2", "--blocks", "2", "--out-dir", str(tmp_path), *extra])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1
        assert f"{tmp_path} is in use by another training run" in err
    with pytest.raises(OutDirBusy):
        train(replace(SETTINGS, seed=1), tmp_path)                  # any run, not only the same checkpoint
    os.kill(process.pid, signal.SIGKILL)                           # the kernel releases its lock
    process.join()
    assert run_to_end(forkserver, tmp_path, replace(SETTINGS, steps=4)) == ("done", 4, None)
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_checkpoint_that_training_did_not_write_is_never_overwritten(forkserver, tmp_path):
    settings = replace(SETTINGS, steps=6)
    process, conn = start(forkserver, tmp_path, settings, pause_at=("after-rename", ".pth", 3))
    while receive(conn)[0] != "paused":
        pass
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    path = tmp_path / settings.file_name
    model = randomize_(TarFlow(settings.model_config(10)), seed=5)
    save_model(model, path)                                         # someone else's weights under the name
    foreign = path.read_bytes()
    with pytest.raises(ValueError, match=rf"{path.name} is not the checkpoint that {resume_path(path).name} "
                                         r"\(step 3\) was saved with: it was replaced after training wrote it"):
        train(settings, tmp_path, resume=True)
    assert path.read_bytes() == foreign
    with pytest.raises(FileExistsError, match="exists; resume it"):
        train(settings, tmp_path)
    path.unlink()                                                   # moved away: the resume file rebuilds it
    assert train(settings, tmp_path, resume=True, stop_after=4).step == 4


def test_a_folder_that_cannot_be_written_fails_before_any_work(tmp_path, monkeypatch):
    def no_data(*args):
        raise AssertionError("the data were loaded before the out-dir was checked")
    monkeypatch.setattr("tarflow_ref.training.train.load_dataset", no_data)
    if os.geteuid() == 0:                        # root writes into any folder with permission bits
        folder = Path("/proc")                   # no file can be created here, not even by root
    else:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o500)
    with pytest.raises(ValueError, match=f"cannot write into {folder} "):
        train(SETTINGS, folder)
    (tmp_path / "a_file").touch()
    with pytest.raises(ValueError, match="cannot use .* as the folder for the checkpoint"):
        train(SETTINGS, tmp_path / "a_file" / "sub")


def test_a_diverging_run_names_the_step_and_the_learning_rate_and_writes_no_nan(tmp_path, capsys):
    settings = replace(SETTINGS, steps=20, warmup=1, lr=1e10)
    with pytest.raises(TrainingDiverged, match=r"the loss is (nan|inf) at step (\d+) \(learning rate 1e\+10\): "
                                               r"training diverged; lower --lr; the checkpoint of step \d+ is kept"):
        train(settings, tmp_path, save_every=1, save_minutes=None)
    state = torch.load(tmp_path / settings.file_name, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    with pytest.raises(SystemExit) as stop:
        main(["train", "--patch", "2", "--blocks", "2", "--steps", "20", "--warmup", "1", "--lr", "1e10",
              "--out-dir", str(tmp_path / "cli")])
    error = capsys.readouterr().err.splitlines()[-1]               # after the progress bar
    assert stop.value.code == 2 and "at step" in error and "learning rate 1e+10" in error
    assert "no checkpoint was written" in error
    assert list((tmp_path / "cli").iterdir()) == []                # nothing written: no NaN checkpoint
