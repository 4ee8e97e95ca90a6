"""One configuration object for every backend, inferred from a state dict or a released file name.

A TarFlow is fixed by: image size S, patch size P, channels c, model width C, number of flow
blocks N, transformer layers per block L, number of classes K (0 = unconditional), head width d
and the training noise sigma. Derived sizes (book/checkpoints.md, "Files and names"):

    T = (S / P)^2   tokens          D = c * P^2   values per token        H = C / d   heads

A released checkpoint stores no configuration: `io.checkpoint.config_from_state_dict` reads every
shape from the tensors, and sigma comes from a file name of the released pattern
`{dataset}_model_{P}_{C}_{blocks}_{layers}_{sigma:.2f}.pth` when there is one (checkpoints this
project trains also carry it in a metadata record, checkpoint.py). Such a name also states P, C,
blocks and layers, and for the five released files the image size and classes (registry.py holds
the table of the released files):
`name_disagreements` lists where it contradicts the tensors, so that a misnamed file is an error,
never a silently wrong sigma.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from .registry import RELEASED_FILES
from .validation import check_integer, check_real

_NAME = re.compile(r"^(?P<dataset>.+)_model_(?P<P>\d+)_(?P<C>\d+)_(?P<N>\d+)_(?P<L>\d+)_(?P<sigma>\d+\.\d+)\.pth$")


class ConfigError(ValueError):
    """A configuration that cannot describe a TarFlow."""


@dataclass(frozen=True)
class TarFlowConfig:
    image_size: int
    patch_size: int
    channels: int = 3
    width: int = 768
    blocks: int = 8
    layers: int = 8
    num_classes: int = 0
    head_dim: int = 64
    noise_std: float | None = None

    def __post_init__(self):
        for name in ("image_size", "patch_size", "channels", "width", "blocks", "layers", "num_classes", "head_dim"):
            check_integer(name, getattr(self, name), error=ConfigError)
        for name in ("image_size", "patch_size", "channels", "width", "blocks", "layers", "head_dim"):
            if getattr(self, name) < 1:  # first: the divisibility checks below divide by two of them
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image size {self.image_size} is not divisible by patch size {self.patch_size}")
        if self.width % self.head_dim:
            raise ConfigError(f"width {self.width} is not divisible by head width {self.head_dim}")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.noise_std is not None:
            check_real("noise_std (sigma of the training noise)", self.noise_std, at_least=0, error=ConfigError)

    @property
    def tokens(self) -> int:
        """T, the number of patches."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        """D, the values per token."""
        return self.channels * self.patch_size ** 2

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def replace(self, **changes) -> TarFlowConfig:
        return replace(self, **changes)

    def file_name(self, dataset: str) -> str:
        """The released naming pattern; `sigma_from_name` reads it back."""
        sigma = 0.0 if self.noise_std is None else self.noise_std
        return f"{dataset}_model_{self.patch_size}_{self.width}_{self.blocks}_{self.layers}_{sigma:.2f}.pth"

    @classmethod
    def from_release_name(cls, name: str) -> TarFlowConfig:
        """The configuration of one of the five released files, from its name alone."""
        base = Path(name).name
        if base not in RELEASED_FILES:
            raise ConfigError(f"unknown released file '{base}'; known: {', '.join(RELEASED_FILES)}")
        m, release = _NAME.match(base), RELEASED_FILES[base]
        return cls(image_size=release.image_size, patch_size=int(m["P"]), channels=3, width=int(m["C"]),
                   blocks=int(m["N"]), layers=int(m["L"]), num_classes=release.classes, head_dim=64,
                   noise_std=float(m["sigma"]))


@dataclass(frozen=True)
class NameFields:
    """What a file name of the released pattern states."""
    dataset: str
    patch_size: int
    width: int
    blocks: int
    layers: int
    sigma: str                     # as written: two decimals

    @property
    def noise_std(self) -> float:
        return float(self.sigma)


def parse_name(path) -> NameFields | None:
    """The fields of a file name of the released pattern, else None."""
    m = _NAME.match(Path(path).name)
    if not m:
        return None
    return NameFields(m["dataset"], int(m["P"]), int(m["C"]), int(m["N"]), int(m["L"]), m["sigma"])


def sigma_from_name(path) -> float | None:
    """sigma from a file name of the released pattern, else None."""
    name = parse_name(path)
    return None if name is None else name.noise_std


def name_disagreements(path, cfg: TarFlowConfig) -> list:
    """(field, what the name says, what cfg has) for every field that a released-pattern name
    states and cfg contradicts: P, C, blocks, layers; for the five released names also the image
    size, the classes and RGB. Empty for a name of another pattern. sigma is not compared: the
    tensors do not hold it."""
    name = parse_name(path)
    if name is None:
        return []
    said = {"patch size": name.patch_size, "width": name.width, "blocks": name.blocks, "layers": name.layers}
    has = {"patch size": cfg.patch_size, "width": cfg.width, "blocks": cfg.blocks, "layers": cfg.layers}
    if Path(path).name in RELEASED_FILES:
        release = RELEASED_FILES[Path(path).name]
        said.update({"image size": release.image_size, "classes": release.classes, "channels": 3})
        has.update({"image size": cfg.image_size, "classes": cfg.num_classes, "channels": cfg.channels})
    return [(field, said[field], has[field]) for field in said if said[field] != has[field]]
