"""Safe, strict loading of TarFlow checkpoints, safe writing of any output file, and conversion
between the torch and NumPy models.

A checkpoint is a plain `torch.save`d state dict of float32 tensors with the released keys
(book/checkpoints.md, "State-dict keys and shapes"). It is read with `torch.load(weights_only=True)`,
so a file can never run code; the configuration is inferred from the tensor shapes; every key is
then checked against the model that configuration builds, and any difference is reported by key
name with the expected and found shapes before anything is loaded. Weights that hold NaN or
infinity are refused, so no command evaluates or samples a diverged model.

What the tensors cannot say, sigma above all, comes from two places (book/checkpoints.md, "Files
and names"), and neither may contradict the tensors:

* a file name of the released pattern `{dataset}_model_{P}_{C}_{blocks}_{layers}_{sigma:.2f}.pth`:
  its P, C, blocks and layers must be those of the tensors (and, for the five released names,
  the image size and classes too);
* the metadata record of checkpoints this project trains: a small JSON record (the configuration
  with sigma, the training settings, the step) stored as one more file inside the zip archive
  that torch.save writes. torch.load reads only the records it asks for, so the file stays a
  plain released-format state dict (weights_only=True, and a strict load_state_dict in any
  code that knows the released keys), and the record travels with the file through every copy
  and rename. A sidecar file would be lost by a copy of the .pth alone, and an extra tensor entry
  would break a strict load elsewhere. When both a record and a released-pattern name are there,
  they must agree on sigma: a renamed file never changes sigma silently.

Files are written through files.written_atomically, so an existing file is replaced only once its
successor is complete.
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, TarFlowConfig, name_disagreements, parse_name
from ..torch_backend.checks import nonfinite_keys
from ..validation import check_finite_params, nonfinite_message
from .files import written_atomically

META_ABOVE = 10_000_000      # parameters: the full-size models have hundreds of millions, the bundled one 0.2 M
METADATA_RECORD = "extra/tarflow_ref.json"      # inside the zip archive, beside torch's data.pkl
SHAPE_FIELDS = ("image_size", "patch_size", "channels", "width", "blocks", "layers", "num_classes")


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


def write_state_dict(state: dict, path, metadata: dict | None = None):
    """torch.save(state, path) and, if given, `metadata` as the JSON record METADATA_RECORD inside
    the same zip archive (module docstring). The bytes depend on the contents and the file name
    only (no time stamps), so a repeated save gives an identical file."""
    path = Path(path)
    torch.save(state, path)
    if metadata is None:
        return
    with zipfile.ZipFile(path, "a") as archive:
        root = archive.namelist()[0].split("/")[0]             # torch names its folder after the file
        record = zipfile.ZipInfo(f"{root}/{METADATA_RECORD}", date_time=(1980, 1, 1, 0, 0, 0))
        archive.writestr(record, json.dumps(metadata, indent=1, sort_keys=True))


def save_model(model, path, metadata: dict | None = None):
    """The released format: a plain state dict of float32 CPU tensors, with an optional metadata
    record (model_metadata); `path` is replaced only when the new file is complete."""
    with written_atomically(path) as partial:
        write_state_dict(float32_state(model), partial, metadata)


def float32_state(model) -> dict:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}


def model_metadata(cfg: TarFlowConfig, **extra) -> dict:
    """The metadata record of a checkpoint: its configuration (with sigma and head width) and
    anything else worth keeping with the weights (train.py adds the settings and the step)."""
    return {"config": asdict(cfg), **extra}


def read_metadata(path) -> dict | None:
    """The metadata record of a checkpoint file, or None when it has none (the released files)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.partition("/")[2] == METADATA_RECORD]
            if not names:
                return None
            record = json.loads(archive.read(names[0]))
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: its metadata record is not readable: {_first_line(err)}") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{path}: its metadata record has no configuration")
    return record


def recorded_config(path, metadata: dict) -> TarFlowConfig:
    """The TarFlowConfig of a metadata record; a clear error for one that describes no TarFlow."""
    config = metadata["config"]
    names = {f.name for f in fields(TarFlowConfig)}
    if set(config) != names:
        raise CheckpointError(f"{path}: its metadata record does not hold a configuration "
                              f"(fields {sorted(config)}, expected {sorted(names)})")
    try:
        return TarFlowConfig(**config)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{path}: its metadata record describes no TarFlow: {err}") from None


def file_digest(path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def load_checkpoint(path, *, device="cpu", noise_std: float | None = None, head_dim: int | None = None):
    """Build the TarFlow a checkpoint describes and load it strictly.

    The shapes come from the tensors; a released-pattern name and the metadata record must agree
    with them (module docstring). sigma: `noise_std` when given (the caller's explicit choice),
    else the metadata record's, else the name's, else None. head_dim: the argument, else the
    record's, else 64 (every released model). Weights with NaN or infinity are refused.
    Returns a torch `TarFlow` in eval mode with `.config`.
    """
    from ..torch_backend.model import TarFlow

    path = Path(path)
    state = read_state_dict(path)
    metadata = read_metadata(path)
    recorded = None if metadata is None else recorded_config(path, metadata)
    if head_dim is None:
        head_dim = 64 if recorded is None else recorded.head_dim
    name = parse_name(path)
    chosen = noise_std is not None
    if not chosen:
        noise_std = recorded.noise_std if recorded is not None else None if name is None else name.noise_std
    cfg = config_from_state_dict(state, noise_std=noise_std, head_dim=head_dim)
    with torch.device(build_device(state)):
        model = TarFlow(cfg)
    check_state_dict(state, model.state_dict())
    check_names_and_record(path, cfg, recorded, sigma_chosen=chosen)
    bad = nonfinite_keys(state)     # last: on a full-size file it reads every weight
    if bad:
        raise CheckpointError(f"{path}: {nonfinite_message(bad)}; it cannot be evaluated or sampled")
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)  # every parameter and buffer: no uninitialised memory remains
    return model.eval()


def build_device(state: dict) -> str:
    """Where load_checkpoint builds the model whose weights it then replaces. A full-size model goes
    on the meta device (shapes only: its random init would cost seconds, then be overwritten); a
    small one on the CPU, because the first operations on the meta device import torch's
    compiler, which costs more seconds than such a model's init."""
    return "meta" if sum(t.numel() for t in state.values()) > META_ABOVE else "cpu"


def check_names_and_record(path: Path, cfg: TarFlowConfig, recorded: TarFlowConfig | None, sigma_chosen=False):
    """The name (released pattern) and the metadata record against the configuration of the
    tensors, and, unless the caller chose sigma, the name's sigma against the record's; a
    CheckpointError names every conflict."""
    conflicts = name_disagreements(path, cfg)
    if conflicts:
        said = ", ".join(f"{field} {named}" for field, named, _ in conflicts)
        found = ", ".join(f"{field} {actual}" for field, _, actual in conflicts)
        raise CheckpointError(f"{path}: the file name says {said}, but the weights have {found}: "
                              f"the name does not describe this checkpoint; rename the file")
    if recorded is None:
        return
    differ = [f for f in SHAPE_FIELDS if getattr(recorded, f) != getattr(cfg, f)]
    if differ:
        raise CheckpointError(f"{path}: its metadata record describes another model than its weights ("
                              + ", ".join(f"{f} {getattr(recorded, f)} vs {getattr(cfg, f)}" for f in differ) + ")")
    name = parse_name(path)
    if not sigma_chosen and name is not None and recorded.noise_std is not None and \
            name.sigma != f"{recorded.noise_std:.2f}":
        raise CheckpointError(f"{path}: the file name says sigma {name.sigma}, but the model was trained with "
                              f"sigma {recorded.noise_std:.2f} (its metadata record); rename the file, "
                              f"or pass noise_std to choose sigma explicitly")


def to_numpy(model_or_state, dtype=np.float64) -> dict:
    """The NumPy model's parameter dict: the same keys, arrays of `dtype`."""
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    target = torch.from_numpy(np.zeros(0, dtype)).dtype
    # one exact conversion and always a copy: the arrays never alias the model's memory
    return {k: v.detach().to("cpu", target, copy=True).numpy() for k, v in state.items()}


def from_numpy(params: dict, cfg: TarFlowConfig, dtype=torch.float64):
    """A torch TarFlow holding the NumPy parameters, loaded strictly; NaN or infinite weights are
    refused, as load_checkpoint refuses them."""
    from ..torch_backend.model import TarFlow

    check_finite_params(params, "evaluated or sampled")
    model = TarFlow(cfg).to(dtype)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in params.items()}
    check_state_dict(state, model.state_dict())
    model.load_state_dict(state, strict=True)
    return model.eval()


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
