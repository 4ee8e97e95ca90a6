"""Output files written so that nothing already written is lost and nothing half-written is left.

* `written_atomically(path)`: one file. It is written under a temporary name and renamed over
  `path` only once complete: a rename within one folder is atomic, so `path` is always either
  the old file or the new one.
* `written_together(paths, force=...)`: files that belong together, such as a PNG grid and the
  .npy of its images, written as one group: an existing file is never replaced without force,
  and either every file of the group is the new one or none is. Two processes writing the same
  group cannot mix their files: the group is written and put in place under a lock on its
  folder(s), and under the lock the old files first move out of the way (into the temporary
  folders), then the new ones move in, so no new file ever stands beside an old one. An error on
  the way puts the old files back; Ctrl-C and SIGTERM wait until the last rename is done. Only
  a process killed outright (SIGKILL, power loss) in the middle of those renames can leave part
  of a group: some files of it missing, never a file of another run.
* `folder_lock(folder, name)`: the exclusive lock on a folder that the group writes and training
  (training/train_state.py) hold.

Temporary files keep the final file name, in a hidden folder `.{name}.XXXXXXXX` beside it (the
same file system, so renaming is one atomic step; PIL and np.save read the format from the
suffix, and torch.save names the records inside its zip after the file). `remove_partials`
removes those a killed process left.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

WRITE_LOCK = ".tarflow_ref-write.lock"
BACKUP = ".old"                     # an old file, moved aside inside the temporary folder while a group moves in


class OutputExists(FileExistsError):
    """An output file exists and the caller did not ask to replace it."""

    def __init__(self, path, meanwhile=False):
        self.path, self.meanwhile = Path(path), meanwhile
        when = " (another process wrote it while this one worked)" if meanwhile else ""
        super().__init__(f"{path} exists{when}; nothing was written")


@contextlib.contextmanager
def written_atomically(path):
    """Yield a temporary path to write to; it replaces `path` only when the block ends without an
    error, so an interrupted or failed write never leaves a half-written file nor loses the old one."""
    path = Path(path)
    folder = Path(tempfile.mkdtemp(prefix=_partial_prefix(path), dir=path.parent))
    partial = folder / path.name
    try:
        yield partial
        _sync(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        folder.rmdir()


@contextlib.contextmanager
def written_together(paths, *, force: bool = False):
    """Yield one temporary path for each of `paths`; when the block ends without an error, the
    files written there take the places of `paths` as one group (module docstring).

    OutputExists, before the block runs, if a path exists and not force (also when another
    process wrote it since the caller last looked); the lock is held from then until the group
    is in place, so keep the block to writing the files.
    """
    paths = [Path(p) for p in paths]
    if len({p.resolve() for p in paths}) != len(paths):
        raise ValueError(f"the same output file twice: {', '.join(map(str, paths))}")
    with contextlib.ExitStack() as stack:
        for folder in sorted({p.parent.resolve() for p in paths}):     # one order for every process: no deadlock
            stack.enter_context(folder_lock(folder, WRITE_LOCK))
        for path in paths:
            remove_partials(path)               # a killed writer's: under the lock no other one is writing
            if path.is_dir():
                raise IsADirectoryError(f"{path} is a folder; an output must be a file")
            if os.path.lexists(path) and not force:
                raise OutputExists(path, meanwhile=True)
        folders = [Path(tempfile.mkdtemp(prefix=_partial_prefix(p), dir=p.parent)) for p in paths]
        stack.callback(lambda: [shutil.rmtree(f, ignore_errors=True) for f in folders])
        partials = [folder / path.name for folder, path in zip(folders, paths)]
        yield partials
        for partial in partials:
            _sync(partial)
        with signals_held():
            _move_in(paths, partials)


def _move_in(paths, partials):
    """The old files into the temporary folders, then the new ones into place; on any error the
    new ones are taken away and the old ones put back."""
    moved, placed = [], []
    try:
        for path, partial in zip(paths, partials):
            if os.path.lexists(path):
                backup = partial.with_name(partial.name + BACKUP)
                os.replace(path, backup)
                moved.append((backup, path))
        for path, partial in zip(paths, partials):
            os.replace(partial, path)
            placed.append(path)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        for backup, path in moved:
            os.replace(backup, path)
        raise


@contextlib.contextmanager
def signals_held(reraise: bool = True):
    """SIGINT and SIGTERM that arrive while the block runs are recorded in the yielded list instead
    of ending the process. When the block ends the first of them takes effect (reraise), or is
    left to the caller (training stops after its step and saves). In the main thread only: Python
    runs signal handlers there, so elsewhere they are not ours to hold and the list stays empty."""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if received and reraise:
            signal.raise_signal(received[0])


@contextlib.contextmanager
def folder_lock(folder, name: str, *, wait: bool = True):
    """Hold an exclusive flock on the hidden file `name` in `folder` while the block runs.

    The kernel releases it when the process ends, however it ends, so a killed holder never
    blocks the next one. wait=False: BlockingIOError at once if another process holds it.
    OSError if the file cannot be created (a folder that cannot be written). Without flock
    (Windows) no lock is taken.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = Path(folder) / name
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break                    # else the previous holder removed the file after we opened it: again
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(lock)                  # while still holding it: a waiting opener sees a new file
        os.close(fd)


def remove_partials(path):
    """Remove the temporary folders that writing `path` leaves when its process is killed (SIGKILL
    allows no clean-up). Only for a caller that knows no other process is writing `path` (one
    that holds the lock of its folder)."""
    path = Path(path)
    for folder in path.parent.glob(_partial_prefix(path) + "*"):
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= {path.name, path.name + BACKUP}:
            shutil.rmtree(folder)


def _partial_prefix(path: Path) -> str:
    return f".{path.name}."


def _sync(path):
    """The file's bytes on disk before it is renamed into place, so a crash cannot leave an empty file."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
