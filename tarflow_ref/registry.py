"""The released files: five TarFlow checkpoints and four FID statistics files in one Hugging Face
repository, and the one table of what each is (book/checkpoints.md, "Files and names", "GS-Jacobi
strategies", "FID statistics files").

    RELEASES            name -> Release: checkpoint file, statistics file, image side and classes
                        (what the file name does not say), the published sampling setting
    RELEASED_FILES      the same releases by checkpoint file name
    find_release(text)  a name, a checkpoint or statistics file name (or a path to one) -> Release, else None
    resolve(text, kind) what `--ckpt afhq256` / `--stats afhq256` mean: a local path as it is, else
                        the released file from the cache folder (download_release)
    download_release    a released file from the cache folder, downloaded there through
                        huggingface_hub when missing; else ReleaseError, one line naming the file
                        and the repository

Everything else about the releases is derived from this table: the configuration of a released
file (config.TarFlowConfig.from_release_name) and the GS-Jacobi presets (strategy.PRESETS). The
module imports nothing of the package but extras.py, so the whole NumPy reference may build on it.

The cache folder is $TARFLOW_REF_CACHE, else ~/.cache/tarflow_ref: files downloaded elsewhere go
there under their released names.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .extras import require

HF_REPO = "encoreus/Transformer_Autoregressive_Flow"
HF_URL = f"https://huggingface.co/{HF_REPO}"
CACHE_ENV = "TARFLOW_REF_CACHE"
KINDS = ("checkpoint", "stats")


class ReleaseError(ValueError):
    """A released file that is neither on this machine nor downloadable now; or an unknown name."""


@dataclass(frozen=True)
class Published:
    """The published sampling setting of a model (the GS-Jacobi release): guidance weight on both
    a and m, not annealed, with tau_u the temperature of the unconditional branch; the denoising
    factor; the strategy's G, J and guess lists in sampling order."""
    guidance: float
    denoise_factor: float
    tau_u: float
    modules: tuple
    iterations: tuple
    guesses: tuple


@dataclass(frozen=True)
class Release:
    name: str                       # --ckpt NAME, --stats NAME, --strategy NAME
    file: str                       # the checkpoint's released file name
    stats: str                      # the FID statistics file of its data set and resolution
    image_size: int                 # the two facts the file name does not carry
    classes: int                    # 0: unconditional
    published: Published | None     # the GS-Jacobi study published four of the five


RELEASES = {r.name: r for r in (
    Release("afhq256", "afhq_model_8_768_8_8_0.07.pth", "afhq_256_fid_stats.pth", 256, 3,
            Published(3.4, 1.4, 1.0, (8, 1, 1, 1, 1, 1, 1, 1), (32, 10, 10, 10, 10, 10, 10, 10),
                      (0, 0, 0, 0, 0, 1, 1, 0))),
    Release("imagenet128", "imagenet_model_4_1024_8_8_0.15.pth", "imagenet_128_fid_stats.pth", 128, 1000,
            Published(1.5, 0.97, 1.0, (1, 8, 1, 1, 1, 1, 1, 1), (10, 32, 10, 10, 10, 10, 10, 10),
                      (0, 1, 0, 0, 0, 0, 1, 0))),
    Release("imagenet64-uncond", "imagenet64_model_2_768_8_8_0.05.pth", "imagenet64_64_fid_stats.pth", 64, 0,
            Published(0.2, 0.9, 0.3, (1, 8, 1, 1, 1, 1, 1, 8), (20, 32, 20, 20, 20, 20, 20, 32),
                      (0, 1, 0, 0, 1, 0, 1, 1))),
    Release("imagenet64-cond-p2", "imagenet_model_2_768_8_8_0.05.pth", "imagenet_64_fid_stats.pth", 64, 1000,
            None),
    Release("imagenet64-cond-p4", "imagenet_model_4_1024_8_8_0.05.pth", "imagenet_64_fid_stats.pth", 64, 1000,
            Published(2.0, 1.0, 1.0, (8, 1, 1, 1, 1, 1, 1, 0), (13, 6, 6, 6, 6, 6, 6, 1),
                      (1, 0, 0, 0, 0, 1, 1, 1))),
)}
RELEASED_FILES = {r.file: r for r in RELEASES.values()}
STATS_FILES = sorted({r.stats for r in RELEASES.values()})


def find_release(text) -> Release | None:
    """The release named by its name, its checkpoint's file name or its statistics file's name
    (the first release using it), or a path ending in one of them; else None."""
    text = Path(str(text)).name
    return next((r for r in RELEASES.values() if text in (r.name, r.file, r.stats)), None)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tarflow_ref")


def local_file(text, kind: str = "checkpoint") -> Path | None:
    """The local copy of a path or released name, or None (never touches the network)."""
    path = Path(str(text)).expanduser()
    if path.is_file():
        return path
    release = find_release(text)
    if release is None:
        return None
    cached = cache_dir() / _file_of(release, text, kind)
    return cached if cached.is_file() else None


def resolve(text, kind: str = "checkpoint") -> Path:
    """A local path as it is; a released name (or file name) from the cache folder, else downloaded into it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got '{kind}'")
    path = Path(str(text)).expanduser()
    if path.is_file():
        return path
    if find_release(text) is None or path.parent != Path("."):          # a path that is not there, or no released name
        if path.is_dir():
            raise ReleaseError(f"{path} is a folder; expected a {'statistics' if kind == 'stats' else kind} file")
        raise ReleaseError(f"{text}: no such file, and not a released name ({', '.join(RELEASES)}, "
                           f"or a released file name)")
    return download_release(text, kind)


def download_release(name, kind: str = "checkpoint") -> Path:
    """The released file that `name` (a release's name or a released file name) means, from the
    cache folder; downloaded there from the Hugging Face repository when missing."""
    release = find_release(name)
    if release is None or Path(str(name)).parent != Path("."):
        raise ReleaseError(f"unknown released file '{name}'; known: {', '.join(RELEASES)} "
                           f"or their files ({', '.join(RELEASED_FILES)}, {', '.join(STATS_FILES)})")
    file, target = _file_of(release, name, kind), cache_dir()
    if (target / file).is_file():
        return target / file
    where = f"'{file}' is not in {target} and could not be downloaded from {HF_URL}"
    advice = f"download it there, put it in {target} (or set {CACHE_ENV}) or pass its path"
    try:
        hf_hub_download = require("huggingface_hub", "downloading").hf_hub_download
    except ImportError as err:
        raise ReleaseError(f"{where} ({err}); {advice}") from None
    try:
        return Path(hf_hub_download(repo_id=HF_REPO, filename=file, local_dir=target))
    except Exception as err:  # noqa: BLE001 (offline, HTTP errors, a full disk: one line for all of them)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ReleaseError(f"{where} ({reason}); {advice}") from None


def _file_of(release: Release, text, kind: str) -> str:
    """The file a name means: a file name stands for itself, a release's name for the kind asked for."""
    name = Path(str(text)).name
    if name in (release.file, release.stats):
        return name
    return release.stats if kind == "stats" else release.file
