"""A training run's state on disk: the checkpoint and its resume file written as one unit and
checked on resume, and the lock that allows one run per folder.

Two files per run, side by side in the out-dir:

    {name}.pth         the model: a released-format state dict with a metadata record (checkpoint.py)
    {name}.resume.pt   everything needed to continue: the settings, the step, the losses, the
                       model's weights, the optimiser and the schedule, the metadata record, and
                       the SHA-256 of the .pth written with it and of the .pth it replaced

A save writes both to temporary files, renames the resume file over its predecessor (the commit
point: from then on the run continues from the new step), then the .pth. A process killed at any
moment leaves either the old pair, or the new resume file beside the old (or no) .pth. Resuming
tells the second case by the digests and writes the .pth again from the resume file's weights
(the same bytes). A .pth that matches neither digest was changed by someone else: resuming
refuses rather than overwrite it. The temporary folders a killed process leaves behind are
removed by the next run in that folder, under the lock.

The lock is an exclusive flock on a hidden file in the out-dir, held for the whole run. The kernel
releases it when the process ends, however it ends, so a killed run never blocks the next one.
Creating that file is also the check, before any work, that the out-dir is writable.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..io.checkpoint import _unpickler_reason, file_digest, write_state_dict
from ..io.files import folder_lock, remove_partials, written_atomically

RESUME_SUFFIX = ".resume.pt"
LOCK_NAME = ".tarflow_ref-train.lock"


class OutDirBusy(ValueError):
    """Another training run holds the lock of this out-dir."""


def resume_path(checkpoint) -> Path:
    return Path(checkpoint).with_suffix(RESUME_SUFFIX)


@contextlib.contextmanager
def locked_out_dir(folder):
    """Hold the exclusive lock of `folder` (an existing folder) while the block runs (io/files.py,
    folder_lock). OutDirBusy if another process holds it; ValueError if no file can be created in
    `folder`."""
    folder = Path(folder)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(folder_lock(folder, LOCK_NAME, wait=False))
        except BlockingIOError:
            raise OutDirBusy(f"{folder} is in use by another training run (it holds {folder / LOCK_NAME}); "
                             f"wait for it to end or choose another --out-dir") from None
        except OSError as err:
            raise ValueError(f"cannot write into {folder} ({err.strerror}); choose another --out-dir") from None
        yield


def remove_stale_partials(path):
    """Temporary folders of the pair's files left by a killed save (call under the lock)."""
    remove_partials(path)
    remove_partials(resume_path(path))


def save_pair(path, weights: dict, metadata: dict, state: dict):
    """Write the checkpoint `path` (weights and metadata record) and its resume file (`state`
    plus the weights, the metadata and the digests) as one unit; see the module docstring."""
    path = Path(path)
    previous = file_digest(path) if path.exists() else None
    with written_atomically(path) as model_partial:
        with written_atomically(resume_path(path)) as resume_partial:
            write_state_dict(weights, model_partial, metadata)
            torch.save({**state, "model": weights, "metadata": metadata, "model_sha256": file_digest(model_partial),
                        "previous_model_sha256": previous}, resume_partial)
        # the inner block has renamed the resume file: the commit point; the .pth follows


def load_pair(path) -> dict:
    """The resume file's contents, after making sure the .pth beside it belongs to it: written
    again from the resume file when a killed save left the previous one (or none); refused when
    it is a file training did not write."""
    path = Path(path)
    resume = resume_path(path)
    try:
        state = torch.load(resume, map_location="cpu", weights_only=True)
        step, digest, previous, weights, metadata = (state[k] for k in (
            "step", "model_sha256", "previous_model_sha256", "model", "metadata"))
    except Exception as err:  # truncated, not a torch.save file, or not one that this version of train() wrote
        raise ValueError(f"{resume}: not a readable resume file "
                         f"({type(err).__name__}: {_unpickler_reason(err)}); start over with --force") from None
    found = file_digest(path) if path.exists() else None
    if found == digest:
        return state
    if found is not None and found != previous:
        raise ValueError(f"{path} is not the checkpoint that {resume.name} (step {step}) was saved with: it was "
                         f"replaced after training wrote it; move it away to continue from the resume file, "
                         f"or start over with --force")
    with written_atomically(path) as partial:          # a save was killed between its two renames
        write_state_dict(weights, partial, metadata)
    return state
