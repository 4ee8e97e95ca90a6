"""Safe, strict loading of TarFlow checkpoints, safe writing of any output file, and conversion
between the torch and NumPy models.

A checkpoint is a plain `torch.save`d state dict of float32 tensors with the released keys
(book/checkpoints.md, "State-dict keys and shapes"). It is read with
`torch.load(weights_only=True)`, so a file can never run code; the configuration is inferred from
the tensor shapes; every key is then checked against the model that configuration builds, and any
difference is reported by key name with the expected and found shapes before anything is loaded. Files are written through
`written_atomically`, so an existing file is replaced only once its successor is complete.
"""
from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from .config import RELEASED_FILES, ConfigError, TarFlowConfig, sigma_from_name
from .registry import HF_REPO as DEFAULT_HUB_REPO


class CheckpointError(ValueError):
    """A file that cannot be loaded as a TarFlow checkpoint; the message names the problem."""


def read_state_dict(path) -> dict:
    """Read a state dict with weights_only=True; clear errors for missing, unsafe or broken files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        # mmap keeps a full-size file out of memory until used; only zip-format files support it
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(err)
        if "global" in reason.lower():  # a pickled Python object: a class or function it would call
            raise CheckpointError(f"{path}: refused to load: the file holds objects other than tensors "
                                  f"(weights_only=True never runs code from a checkpoint): {reason}") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or not a torch.save file): "
                              f"{reason}") from None
    except Exception as err:  # bytes that are not a pickle can fail anywhere inside the unpickler
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch.save file): "
                              f"{type(err).__name__}: {_first_line(err)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):  # e.g. a training checkpoint {'model': ..., 'optimizer': ...}
            raise CheckpointError(f"{path}: expected a state dict of tensors, but '{key}' holds a "
                                  f"{type(value).__name__}")
    return state


@contextlib.contextmanager
def written_atomically(path):
    """Yield a temporary path to write to; it replaces `path` only when the block ends without an
    error, so an interrupted or failed write never leaves a half-written file nor loses the old one.

    The temporary file has the same name, in a hidden folder beside `path` (same file system, so
    the replacement is one atomic rename): PIL and np.save read the format from the suffix, and
    torch.save names the records inside its zip after the file, so the bytes match a direct save.
    """
    path = Path(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    partial = folder / path.name
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        folder.rmdir()


def config_from_state_dict(state: dict, *, noise_std: float | None = None, head_dim: int = 64) -> TarFlowConfig:
    """Infer the configuration from tensor shapes.

    T and C come from `pos_embed: [T, C]`, D from `proj_in.weight: [C, D]`, K from
    `class_embed: [K, 1, C]`, N and L from the key indices. D = c P^2 with c in {1, 3} has one
    solution (3 P^2 is never a square), so grayscale and RGB checkpoints need no flag.
    """
    blocks = _count(state, r"^blocks\.(\d+)\.")
    layers = _count(state, r"^blocks\.0\.attn_blocks\.(\d+)\.")
    if blocks == 0 or layers == 0:
        raise CheckpointError("no 'blocks.{b}.attn_blocks.{l}.*' keys: not a TarFlow state dict")
    T, C = _shape(state, "blocks.0.pos_embed", 2)
    _, D = _shape(state, "blocks.0.proj_in.weight", 2)
    channels, patch = _channels_and_patch(D)
    grid = math.isqrt(T)
    if grid * grid != T:
        raise CheckpointError(f"'blocks.0.pos_embed' has {T} tokens, which is not a square patch grid")
    classes = _shape(state, "blocks.0.class_embed", 3)[0] if "blocks.0.class_embed" in state else 0
    try:
        return TarFlowConfig(image_size=grid * patch, patch_size=patch, channels=channels, width=C,
                             blocks=blocks, layers=layers, num_classes=classes, head_dim=head_dim,
                             noise_std=noise_std)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def check_state_dict(state: dict, expected: dict, what: str = "checkpoint does not match a TarFlow"):
    """Compare key sets and shapes with a model's own state dict; raise naming every difference after `what`."""
    problems = [f"missing key '{k}' (expected shape {list(v.shape)})" for k, v in expected.items() if k not in state]
    problems += [f"unexpected key '{k}' (shape {list(v.shape)})" for k, v in state.items() if k not in expected]
    problems += [f"key '{k}' has shape {list(state[k].shape)}, expected {list(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise CheckpointError(f"{what}: {shown}")
    # compared with a fresh tril, not with `expected`: load_checkpoint builds that on the meta device
    bad_masks = [k for k in state if k.endswith("attn_mask")
                 and not torch.equal(state[k], torch.tril(torch.ones_like(state[k])))]
    if bad_masks:
        raise CheckpointError(f"'{bad_masks[0]}' is not the lower-triangular causal mask of ones")


def load_checkpoint(path, *, device="cpu", noise_std: float | None = None, head_dim: int = 64):
    """Build the TarFlow a checkpoint describes and load it strictly.

    sigma comes from `noise_std`, else from a file name of the released pattern, else None.
    Returns a torch `TarFlow` in eval mode with `.config`.
    """
    from .torch_backend.model import TarFlow

    state = read_state_dict(path)
    sigma = noise_std if noise_std is not None else sigma_from_name(path)
    cfg = config_from_state_dict(state, noise_std=sigma, head_dim=head_dim)
    with torch.device("meta"):  # shapes only: a full-size random init would cost seconds, then be overwritten
        model = TarFlow(cfg)
    check_state_dict(state, model.state_dict())
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)  # every parameter and buffer: no uninitialised memory remains
    return model.eval()


def to_numpy(model_or_state, dtype=np.float64) -> dict:
    """The NumPy model's parameter dict: the same keys, arrays of `dtype`."""
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    target = torch.from_numpy(np.zeros(0, dtype)).dtype
    # one exact conversion and always a copy: the arrays never alias the model's memory
    return {k: v.detach().to("cpu", target, copy=True).numpy() for k, v in state.items()}


def from_numpy(params: dict, cfg: TarFlowConfig, dtype=torch.float64):
    """A torch TarFlow holding the NumPy parameters, loaded strictly."""
    from .torch_backend.model import TarFlow

    model = TarFlow(cfg).to(dtype)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in params.items()}
    check_state_dict(state, model.state_dict())
    model.load_state_dict(state, strict=True)
    return model.eval()


def download_release(name: str, *, repo_id: str = DEFAULT_HUB_REPO, cache_dir=None) -> Path:
    """Fetch one released file from the Hugging Face hub (optional dependency `huggingface_hub`)."""
    if name not in RELEASED_FILES:
        raise CheckpointError(f"unknown released file '{name}'; known: {', '.join(RELEASED_FILES)}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError("downloading needs the optional package huggingface_hub "
                              "(pip install huggingface_hub); or pass a local path") from None
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=name, cache_dir=cache_dir))
    except Exception as err:  # offline, unknown repo, HTTP errors: all end the same way for the user
        raise CheckpointError(f"could not download '{name}' from the hub repo '{repo_id}' "
                              f"(offline?): {_first_line(err)}. Download it elsewhere and pass the local path.") from None


def _unpickler_reason(err) -> str:
    """The one informative sentence of torch's long weights-only error message."""
    text = str(err)
    _, found, rest = text.partition("WeightsUnpickler error:")
    if found and rest.strip():
        reason = rest.strip().splitlines()[0]
    else:  # a blocked module (os.system, ...) comes without that prefix: "... unsupported GLOBAL posix.system ..."
        reason = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), _first_line(err))
    return reason.split(". Please")[0]


def _first_line(err) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _count(state, pattern) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _shape(state, key, rank):
    if key not in state:
        raise CheckpointError(f"missing key '{key}': not a TarFlow state dict")
    shape = tuple(state[key].shape)
    if len(shape) != rank:
        raise CheckpointError(f"key '{key}' has shape {list(shape)}, expected {rank} dimensions")
    return shape


def _channels_and_patch(D: int):
    for channels in (3, 1):
        patch = math.isqrt(D // channels)
        if patch > 0 and D % channels == 0 and channels * patch * patch == D:
            return channels, patch
    raise CheckpointError(f"proj_in takes {D} values per token, which is neither 3*P^2 nor P^2")
