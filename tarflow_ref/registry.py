"""The released files: five TarFlow checkpoints and four FID statistics files in one Hugging Face
repository, what each model is, which statistics file scores it, its published sampling settings
(book/checkpoints.md, "Files and names", "GS-Jacobi strategies", "FID statistics files").

    RELEASES            short name -> Release(file, stats, title); .config, .preset
    find_release(text)  a short name, a released file name or a preset name -> Release, else None
    resolve(text, kind) what `--ckpt afhq` / `--stats afhq` mean: a local path as it is; else a
                        released name looked up in the cache folder, else downloaded there through
                        huggingface_hub; else ReleaseError, one line naming the file and the repository

The cache folder is $TARFLOW_REF_CACHE, else ~/.cache/tarflow_ref: put files downloaded elsewhere
there under their released names. The configurations and the published settings come from
config.RELEASED_FILES and strategy.PRESETS; this module adds the names, the statistics files and
the places to find them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import TarFlowConfig
from .strategy import PRESETS

HF_REPO = "encoreus/Transformer_Autoregressive_Flow"
HF_URL = f"https://huggingface.co/{HF_REPO}"
CACHE_ENV = "TARFLOW_REF_CACHE"
KINDS = ("checkpoint", "stats")


class ReleaseError(ValueError):
    """A released file that is neither on this machine nor downloadable now; or an unknown name."""


@dataclass(frozen=True)
class Release:
    name: str            # short name: --ckpt afhq
    file: str            # the checkpoint's released file name
    stats: str           # the FID statistics file of its data set and resolution
    title: str

    @property
    def config(self) -> TarFlowConfig:
        return TarFlowConfig.from_release_name(self.file)

    @property
    def preset(self):
        """The published sampling setting (strategy.Preset: GS-Jacobi strategy, guidance weight and
        tau_u, denoising factor), or None: the GS-Jacobi study published four of the five."""
        return PRESETS.get(self.file)


RELEASES = {r.name: r for r in (
    Release("afhq", "afhq_model_8_768_8_8_0.07.pth", "afhq_256_fid_stats.pth", "AFHQ 256x256, 3 classes"),
    Release("imagenet128", "imagenet_model_4_1024_8_8_0.15.pth", "imagenet_128_fid_stats.pth",
            "ImageNet 128x128, 1000 classes"),
    Release("imagenet64-uncond", "imagenet64_model_2_768_8_8_0.05.pth", "imagenet64_64_fid_stats.pth",
            "ImageNet 64x64, unconditional"),
    Release("imagenet64-cond-p2", "imagenet_model_2_768_8_8_0.05.pth", "imagenet_64_fid_stats.pth",
            "ImageNet 64x64, 1000 classes, patch 2"),
    Release("imagenet64-cond-p4", "imagenet_model_4_1024_8_8_0.05.pth", "imagenet_64_fid_stats.pth",
            "ImageNet 64x64, 1000 classes, patch 4"),
)}
STATS_FILES = sorted({r.stats for r in RELEASES.values()})


def find_release(text) -> Release | None:
    """The release named by a short name, its checkpoint's file name, its preset's name or its
    statistics file's name (the first release using it), else None."""
    text = Path(str(text)).name
    for r in RELEASES.values():
        if text in (r.name, r.file, r.stats) or (r.preset is not None and text == r.preset.name):
            return r
    return None


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
    """A local path as it is; a released name from the cache folder, else downloaded into it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got '{kind}'")
    found = local_file(text, kind)
    if found is not None:
        return found
    path = Path(str(text)).expanduser()
    release = find_release(text)
    if release is None or path.parent != Path("."):          # a path that is not there, or no released name
        if path.is_dir():
            raise ReleaseError(f"{path} is a folder; expected a {'statistics' if kind == 'stats' else kind} file")
        names = ", ".join(RELEASES)
        raise ReleaseError(f"{text}: no such file, and not a released name ({names}, or a released file name)")
    return download(_file_of(release, text, kind))


def download(file: str) -> Path:
    """One released file from the Hugging Face repository into the cache folder."""
    target = cache_dir()
    where = f"'{file}' is not in {target} and could not be downloaded from {HF_URL}"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ReleaseError(f"{where} (downloading needs the package huggingface_hub); download it there, "
                           f"put it in {target} (or set {CACHE_ENV}) or pass its path") from None
    try:
        return Path(hf_hub_download(repo_id=HF_REPO, filename=file, local_dir=target))
    except Exception as err:  # noqa: BLE001 (offline, HTTP errors, a full disk: one line for all of them)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ReleaseError(f"{where} ({reason}); download it there, put it in {target} (or set {CACHE_ENV}) "
                           f"or pass its path") from None


def _file_of(release: Release, text, kind: str) -> str:
    """The file a name means: a file name stands for itself, a short name for the kind asked for."""
    name = Path(str(text)).name
    if name in (release.file, release.stats):
        return name
    return release.stats if kind == "stats" else release.file
