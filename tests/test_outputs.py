"""Nothing already written is lost: an output file is never replaced without --force (a read-only one
included), every output is written atomically, and a PNG and its .npy are written as one group
(io/files.py): both or neither, and never one run's PNG beside another run's .npy, whether a
second run writes into the same --out at the same time, the write fails, Ctrl-C arrives, or the
process is killed between two renames.
"""
import os
import signal
import stat
import threading

import numpy as np
import pytest
from PIL import Image

from tarflow_ref.cli import main
from tarflow_ref.cli.common import save_grid

SAMPLE = ["sample", "--n", "3", "--class", "1", "4", "--no-denoise"]


def sample(seed, png, npy=None, *extra):
    return main([*SAMPLE, "--seed", str(seed), "--out", str(png), *(["--npy", str(npy)] if npy else []), *extra])


def stopped(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    return err


def same_run(png, npy) -> bool:
    """The PNG shows exactly the images of the .npy beside it."""
    images = np.load(npy)
    again = png.with_name("again.png")
    save_grid(images, again, cols=2, scale=7)
    same = np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again)))
    again.unlink()
    return same


def hidden(folder) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("existing", ["png", "npy", "read-only png", "trace png"])
def test_an_existing_output_is_never_replaced_without_force(existing, tmp_path, capsys):
    png, npy = tmp_path / "s.png", tmp_path / "s.npy"
    target = npy if existing == "npy" else png
    target.write_bytes(b"a user's file")
    if existing == "read-only png":
        target.chmod(stat.S_IRUSR)
    argv = ["trace", "--n", "1", "--out", str(png)] if existing == "trace png" else \
        [*SAMPLE, "--out", str(png), "--npy", str(npy)]
    err = stopped(argv, capsys)
    assert f"{target} exists; pass --force to replace it" in err
    assert target.read_bytes() == b"a user's file"
    assert sorted(tmp_path.iterdir()) == [target]                           # nothing else written either


def test_force_replaces_every_output_even_a_read_only_one(tmp_path):
    png, npy = tmp_path / "s.png", tmp_path / "s.npy"
    sample(1, png, npy)
    first = np.load(npy)
    png.chmod(stat.S_IRUSR)
    npy.chmod(stat.S_IRUSR)
    sample(2, png, npy, "--force")
    assert not np.array_equal(np.load(npy), first) and same_run(png, npy)
    main(["trace", "--n", "1", "--out", str(png), "--force"])
    assert np.asarray(Image.open(png)).shape == (70, 6 * 70)
    assert hidden(tmp_path) == []                                            # no lock or temporary folder left


@pytest.mark.parametrize("force", [False, True])
def test_two_runs_into_the_same_out_never_mix_their_png_and_npy(force, tmp_path, monkeypatch):
    """The first run stops for a while right after its PNG is in place; the second run, started
    then, must neither put its .npy beside the first run's PNG (it waits for the lock), nor
    replace the first run's pair without --force."""
    png, npy = tmp_path / "s.png", tmp_path / "s.npy"
    first_png_placed, second_done, codes = threading.Event(), threading.Event(), {}
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if str(dst) == str(png) and threading.current_thread().name == "first":
            first_png_placed.set()
            second_done.wait(timeout=2)         # the second run may finish meanwhile, if nothing stops it

    def run(seed):
        try:
            sample(seed, png, npy, *(["--force"] if force else []))
            codes[seed] = 0
        except SystemExit as stop:
            codes[seed] = stop.code
        finally:
            if seed == 2:
                second_done.set()
    monkeypatch.setattr(os, "replace", replace)
    first = threading.Thread(target=run, args=(1,), name="first")
    first.start()
    assert first_png_placed.wait(timeout=60)
    second = threading.Thread(target=run, args=(2,), name="second")
    second.start()
    first.join(timeout=120)
    second.join(timeout=120)
    assert same_run(png, npy), "one run's PNG beside the other run's .npy"
    assert codes == {1: 0, 2: 0 if force else 2}
    winner = np.load(npy)
    sample(2 if force else 1, tmp_path / "alone.png", tmp_path / "alone.npy")
    assert np.array_equal(winner, np.load(tmp_path / "alone.npy"))         # the second run's pair only with --force


def test_a_write_that_fails_midway_leaves_no_output(tmp_path, capsys, monkeypatch):
    """The .npy cannot be written (a full disk): no PNG may be left without its .npy."""
    png, npy = tmp_path / "s.png", tmp_path / "s.npy"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "save", full_disk)
    err = stopped([*SAMPLE, "--out", str(png), "--npy", str(npy)], capsys)
    assert (f"cannot write {png}, {npy} (No space left on device); nothing was written and existing files are "
            "unchanged") in err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_puts_the_old_pair_back(tmp_path, monkeypatch):
    from tarflow_ref.io.files import written_together

    png, npy = tmp_path / "s.png", tmp_path / "s.npy"
    png.write_text("old png")
    npy.write_text("old npy")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(npy) and "old" not in open(src).read():
            raise OSError(5, "Input/output error")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        with written_together([png, npy], force=True) as (new_png, new_npy):
            new_png.write_text("new png")
            new_npy.write_text("new npy")
    assert (png.read_text(), npy.read_text()) == ("old png", "old npy")
    assert hidden(tmp_path) == []
    with pytest.raises(ZeroDivisionError):                                  # an error while writing: the same
        with written_together([png, npy], force=True) as (new_png, new_npy):
            new_png.write_text("new png")
            raise ZeroDivisionError
    assert (png.read_text(), npy.read_text()) == ("old png", "old npy") and hidden(tmp_path) == []


def test_ctrl_c_during_the_renames_lets_the_pair_finish_then_stops(tmp_path, monkeypatch):
    png, npy = tmp_path / "s.png", tmp_path / "s.npy"
    # Python's own Ctrl-C handler, also where the suite runs with SIGINT ignored (a background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ctrl_c_between_the_renames(png, npy, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def ctrl_c_between_the_renames(png, npy, monkeypatch):
    from tarflow_ref.io.files import written_together

    real_replace, handler = os.replace, signal.getsignal(signal.SIGINT)

    def replace(src, dst):
        real_replace(src, dst)
        if str(dst) == str(png):
            os.kill(os.getpid(), signal.SIGINT)                              # Ctrl-C between the two renames
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with written_together([png, npy]) as (new_png, new_npy):
            new_png.write_text("new png")
            new_npy.write_text("new npy")
    assert (png.read_text(), npy.read_text()) == ("new png", "new npy")
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a writer at a chosen rename")
@pytest.mark.parametrize("killed_at", range(4))
def test_a_writer_killed_at_any_rename_never_leaves_a_mixed_pair(killed_at, tmp_path):
    """Replacing a pair takes four renames (old PNG out, old .npy out, new PNG in, new .npy in); a
    child process is killed (os._exit, no clean-up) before rename `killed_at`. What remains is
    the old pair, part of it, or part of the new one, never an old file beside a new one; the
    next write clears what the killed one left."""
    from tarflow_ref.io.files import written_together

    png, npy = tmp_path / "s.png", tmp_path / "s.npy"
    png.write_text("old")
    npy.write_text("old")
    pid = os.fork()
    if pid == 0:                                                             # the child: write, die at a rename
        renames, real_replace = [0], os.replace

        def replace(src, dst):
            if renames[0] == killed_at:
                os._exit(9)
            renames[0] += 1
            real_replace(src, dst)
        os.replace = replace
        try:
            with written_together([png, npy], force=True) as (new_png, new_npy):
                new_png.write_text("new")
                new_npy.write_text("new")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    left = tuple(p.read_text() if p.exists() else None for p in (png, npy))
    assert left == [("old", "old"), (None, "old"), (None, None), ("new", None)][killed_at]
    with written_together([png, npy], force=True) as (new_png, new_npy):
        new_png.write_text("next")
        new_npy.write_text("next")
    assert (png.read_text(), npy.read_text()) == ("next", "next") and hidden(tmp_path) == []
