"""FID in torch (book/checkpoints.md, "FID statistics files"): images made as the released evaluation
makes them, features from the network stored in a statistics file, float64 statistics
(tarflow_ref/frechet.py), the statistics files themselves, and a run that can be resumed.

    samples x (model range) -> clip to [-1, 1] -> 0.5 (x + 1) -> (x * 255) truncated to uint8    to_uint8
    uint8 images [B, c, H, W] -> network -> features [B, F] float32 -> float64 sums              accumulate
    FID = the Fréchet distance of the two Gaussians                                              frechet.py

A statistics file is the state dict of torchmetrics' FrechetInceptionDistance with its metric
states stored as buffers:

    real_features_sum [F] float64   real_features_cov_sum [F, F] float64   real_features_num_samples int64 []
    fake_features_sum, fake_features_cov_sum, fake_features_num_samples    (the same shapes, zeros)
    {prefix}.*   the feature network: 'inception.*' (torch_backend/inception.py, 566 entries, F = 2048) in the
                 released files, 'digit_features.*' (digit_features.py, F = 64) in the digits' file

`read_stats_file` loads one with weights_only=True, checks every key, shape and dtype before it
builds the network, and loads the network strictly; `write_stats_file` writes the same layout,
so a file made here loads the same way as a released one.

`accumulate` runs a source of images through the network batch by batch. With a state file it
writes, every `save_every` batches and atomically, the sums, the count, the seconds spent, the
source's own state (the noise generator of sampled images) and the settings it started with; run
again with the same state file, it continues after the last saved batch and ends with the same
sums, hence the same FID, as an uninterrupted run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..frechet import FeatureStats
from ..io.checkpoint import CheckpointError, check_state_dict, read_state_dict
from ..io.files import written_atomically
from ..torch_backend import distributed
from ..torch_backend.inception import InceptionV3
from ..training.data import IMAGE_SUFFIXES, center_crop, to_unit_range
from .digit_features import DigitFeatures

NETWORKS = {net.prefix: net for net in (InceptionV3, DigitFeatures)}
SIDES = ("real", "fake")
STATE_FORMAT = "tarflow_ref fid run 2"


class StatsFileError(ValueError):
    """A statistics file or run state that cannot be used; the message names the file and the problem."""


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Samples in model range -> uint8 as the released evaluation: clip, 0.5 (x + 1), (x * 255) truncated
    (not rounded: 254.9 -> 254)."""
    return (to_unit_range(x) * 255).to(torch.uint8)


# ---- statistics files -------------------------------------------------------------------------------

def read_stats_file(path, device="cpu"):
    """-> (FeatureStats of the real images, the feature network in eval mode on `device`).

    Refuses, with one line naming the file and the problem: a missing file, anything but plain
    tensors (weights_only=True), a missing or extra key, a wrong shape or dtype, fewer than 2 samples.
    """
    path = Path(path)
    if not path.is_file():
        raise StatsFileError(f"{path}: no such statistics file")
    try:
        state = read_state_dict(path)
    except CheckpointError as err:
        raise StatsFileError(str(err).replace("checkpoint", "statistics file")) from None
    what = f"{path}: not a statistics file in the released layout"
    found = [p for p in NETWORKS if any(k.startswith(p + ".") for k in state)]
    if len(found) != 1:
        names = " or ".join(f"'{p}.*'" for p in NETWORKS)
        raise StatsFileError(f"{what}: " + ("no feature network (no " + names + " entries)" if not found
                                            else f"it holds two feature networks ({', '.join(found)})"))
    network_class = NETWORKS[found[0]]
    with torch.device("meta"):                                   # shapes only, before anything is loaded
        network = network_class()
    expected = {**_stats_shapes(network_class.features),
                **{f"{network.prefix}.{k}": v for k, v in network.state_dict().items()}}
    try:
        check_state_dict(state, expected, what)
    except CheckpointError as err:
        raise StatsFileError(str(err)) from None
    for side in SIDES:
        for key, dtype in (("sum", torch.float64), ("cov_sum", torch.float64), ("num_samples", torch.int64)):
            t = state[f"{side}_features_{key}"]
            if t.dtype != dtype:
                raise StatsFileError(f"{what}: '{side}_features_{key}' is {t.dtype}, expected {dtype}")
    real = _stats_from(state, "real")
    if real.n < 2:
        raise StatsFileError(f"{what}: 'real_features_num_samples' is {real.n}; a covariance needs at least 2")
    network = network.to_empty(device=device)
    start = len(network.prefix) + 1
    network.load_state_dict({k[start:]: v for k, v in state.items() if k.startswith(network.prefix + ".")},
                            strict=True)
    return real, network.eval()


def write_stats_file(path, stats: FeatureStats, network):
    """The released layout: `stats` as the real statistics, zero fake statistics, the network's
    weights under its prefix. Replaces `path` only once the new file is complete."""
    if stats.dim != network.features:
        raise ValueError(f"statistics of {stats.dim} features do not fit the network's {network.features}")
    state = {}
    for side, s in (("real", stats), ("fake", FeatureStats.empty(stats.dim))):
        state.update({f"{side}_{k}": torch.from_numpy(np.array(v)) for k, v in s.arrays().items()})
    state.update({f"{network.prefix}.{k}": v.detach().cpu() for k, v in network.state_dict().items()})
    with written_atomically(path) as partial:
        torch.save(state, partial)


def _stats_shapes(F: int) -> dict:
    shapes = {"sum": (F,), "cov_sum": (F, F), "num_samples": ()}
    return {f"{side}_features_{k}": torch.empty(s, device="meta") for side in SIDES for k, s in shapes.items()}


def _stats_from(state: dict, side: str) -> FeatureStats:
    # copies: the file may be memory-mapped and FeatureStats adds in place
    return FeatureStats(state[f"{side}_features_sum"].numpy().copy(), state[f"{side}_features_cov_sum"].numpy().copy(),
                        int(state[f"{side}_features_num_samples"]))


# ---- sources of images ------------------------------------------------------------------------------

class Images:
    """Images already on disk or in memory, batch by batch: n, starts(), batch(start) -> uint8
    [b, c, H, W]; no state of their own (SampleStream in torch_backend/draw.py is the source of sampled images)."""
    n: int
    batch_size: int

    def starts(self) -> range:
        return range(0, self.n, self.batch_size)

    def state(self, start: int) -> dict:
        return {}

    def restore(self, state: dict):
        pass


class ArrayImages(Images):
    """An array of images: uint8 in 0..255 or floats in [0, 1] (made uint8 by (x * 255) truncated,
    like the released evaluation), [N, c, H, W], [N, H, W, c] (c = 1 or 3) or grey [N, H, W]."""

    def __init__(self, images, batch_size: int = 100, where: str = "images"):
        images = images.numpy() if isinstance(images, torch.Tensor) else images
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4 or not (images.shape[1] in (1, 3) or images.shape[3] in (1, 3)):
            raise ValueError(f"{where}: expected images [N, c, H, W] or [N, H, W, c] with c = 1 or 3, "
                             f"got shape {list(images.shape)}")
        self.channels_last = images.shape[1] not in (1, 3)
        if images.dtype != np.uint8:
            if images.dtype.kind != "f":
                raise ValueError(f"{where}: expected uint8 images or floats in [0, 1], got {images.dtype}")
            low, high = float(images.min()), float(images.max())
            if not (0 <= low and high <= 1):
                raise ValueError(f"{where}: float images must lie in [0, 1], these span [{low:g}, {high:g}]")
        self.images, self.n, self.batch_size = images, len(images), batch_size

    def batch(self, start: int) -> torch.Tensor:
        x = np.array(self.images[start:start + self.batch_size])         # a copy: the array may be memory-mapped
        if self.channels_last:
            x = x.transpose(0, 3, 1, 2)
        x = torch.from_numpy(np.ascontiguousarray(x))                   # [b, c, H, W]
        return x if x.dtype == torch.uint8 else (x * 255).to(torch.uint8)


class FolderImages(Images):
    """Every image file under a folder (sorted, sub-folders included), read batch by batch as grey
    (channels 1) or RGB (3); with `size`, resized (shorter side) and centre-cropped to size x size,
    else all must have the same size."""

    def __init__(self, root, channels: int, size: int | None = None, batch_size: int = 100):
        root = Path(root)
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise ValueError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        self.channels, self.size, self.n, self.batch_size = channels, size, len(self.paths), batch_size
        self.shape = None

    def batch(self, start: int) -> torch.Tensor:
        from PIL import Image

        out = []
        for path in self.paths[start:start + self.batch_size]:
            try:
                with Image.open(path) as img:
                    img = img.convert("L" if self.channels == 1 else "RGB")
                    if self.size is not None:
                        img = center_crop(img, self.size)
                    pixels = np.asarray(img, dtype=np.uint8).reshape(img.height, img.width, self.channels)
            except OSError as err:
                raise ValueError(f"{path}: not a readable image ({err})") from None
            if self.shape is None:
                self.shape, self.first = pixels.shape, path
            if pixels.shape != self.shape:
                raise ValueError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} but {self.first} is "
                                 f"{self.shape[1]}x{self.shape[0]}; give an image size to crop all to one size")
            out.append(pixels.transpose(2, 0, 1))
        return torch.from_numpy(np.stack(out))


def read_images(path, channels: int, size: int | None = None, batch_size: int = 100) -> Images:
    """A folder of image files, a .npy array or a .npz archive (its only array, or 'arr_0') -> Images."""
    path = Path(path)
    if path.is_dir():
        return FolderImages(path, channels, size, batch_size)
    if not path.is_file():
        raise ValueError(f"{path}: no such folder or file of images")
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            names = archive.files
            if len(names) != 1 and "arr_0" not in names:
                raise ValueError(f"{path}: holds {', '.join(names)}; expected one array (or 'arr_0')")
            array = archive[names[0] if len(names) == 1 else "arr_0"]
    else:
        raise ValueError(f"{path}: expected a folder of images, a .npy or a .npz file")
    return ArrayImages(array, batch_size, where=str(path))


# ---- a run --------------------------------------------------------------------------------------------

@dataclass
class Run:
    stats: FeatureStats           # of the images so far
    seconds: float                # spent getting the images (sampling, reading)
    feature_seconds: float        # spent in the feature network
    complete: bool                # every image of the source is in `stats`

    @property
    def images_per_second(self) -> float:
        return self.stats.n / self.seconds if self.seconds > 0 else float("inf")


def accumulate(source, network, *, state_path=None, settings: dict | None = None, save_every: int = 10,
               stop_after: int | None = None, restart: bool = False, progress=None) -> Run:
    """Statistics of every image of `source` (module docstring), resumable through `state_path`.

    source: n, starts(), batch(start) -> uint8 images (or model-range floats, made uint8 by
    to_uint8), state(start), restore(state). settings: {name: text} that must match when resuming.
    stop_after: end (state saved) after this many batches of this call; restart: ignore a saved
    state (it is replaced at the first save); progress wraps the batch loop.

    Under torchrun (torch_backend/distributed.py) the batches are dealt round robin, batch i of
    this call to rank i mod W: a round is W batches, one per rank. Each rank adds the features of
    its own batches; the sums are added over the ranks at each save and at the end, and rank 0
    writes the state. The result, on every rank, is the statistics of the same images as one
    process's, the sums equal up to the order of the float64 additions. `seconds` are rank 0's.
    """
    settings = {k: str(v) for k, v in (settings or {}).items()}
    device = next(network.parameters()).device
    world, rank = distributed.world_size(), distributed.rank()
    run = Run(FeatureStats.empty(network.features), 0.0, 0.0, False)
    if state_path is not None and not restart:
        saved = distributed.on_main(lambda: _resume(Path(state_path), settings, network.features))
        if saved is not None:
            run, source_state = saved
            source.restore(source_state)
    own = run.stats if distributed.is_main() else FeatureStats.empty(network.features)    # this rank's sums
    starts = [s for s in source.starts() if s >= run.stats.n]
    rounds = range(0, len(starts), world)
    saved = 0
    for first in progress(rounds) if progress and starts else rounds:
        if first + rank < len(starts):
            t0 = time.perf_counter()
            images = source.batch(starts[first + rank])
            t1 = time.perf_counter()
            images = images if images.dtype == torch.uint8 else to_uint8(images)
            features = network(images.to(device)).double().cpu().numpy()          # [b, F]
            own.add(features)
            run.seconds += t1 - t0
            run.feature_seconds += time.perf_counter() - t1
        batches = min(first + world, len(starts))                                 # done by this call
        stopping = stop_after is not None and batches >= stop_after
        if state_path is not None and (batches - saved >= save_every or batches == len(starts) or stopping):
            run.stats = _over_ranks(own)
            if distributed.is_main():
                _save(Path(state_path), run, source.state(starts[batches] if batches < len(starts) else source.n),
                      settings)
            saved = batches
        if stopping:
            break
    run.stats = _over_ranks(own)
    run.complete = run.stats.n >= source.n
    return run


def _over_ranks(stats: FeatureStats) -> FeatureStats:
    """The statistics of every rank's images: each of the three sums added over the ranks."""
    return FeatureStats.from_arrays({k: distributed.sum_over_ranks(torch.from_numpy(np.asarray(v))).numpy()
                                     for k, v in stats.arrays().items()})


def _save(path: Path, run: Run, source_state: dict, settings: dict):
    state = {"format": STATE_FORMAT, "settings": settings, "seconds": run.seconds,
             "feature_seconds": run.feature_seconds, "source": source_state,
             **{k: torch.from_numpy(np.array(v)) for k, v in run.stats.arrays().items()}}
    with written_atomically(path) as partial:
        torch.save(state, partial)


def _resume(path: Path, settings: dict, features: int):
    """(Run, the source's state) saved at `path`, or None when there is no such file."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (a truncated, foreign or unsafe file: all end the same way)
        raise StatsFileError(f"{path}: not a readable fid run state ({type(err).__name__}); "
                             f"remove it or pass --force to start over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise StatsFileError(f"{path}: not a fid run state of this version; remove it or pass --force to start over")
    saved = state["settings"]
    changed = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if changed:
        k = changed[0]
        raise StatsFileError(f"{path} belongs to a run with other settings ({k}: {saved.get(k, 'unset')} there, "
                             f"{settings.get(k, 'unset')} now); use another state file, or --force to start over")
    stats = FeatureStats.from_arrays({k: state[k].numpy() for k in ("features_sum", "features_cov_sum",
                                                                     "features_num_samples")})
    if stats.dim != features:
        raise StatsFileError(f"{path}: holds {stats.dim} features, the network makes {features}")
    return Run(stats, state["seconds"], state["feature_seconds"], False), state["source"]
