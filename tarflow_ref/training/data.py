"""Image data for training and evaluation: scikit-learn's bundled digits and image folders.

Every data set is held as 8-bit images, `images: [N, c, S, S]` uint8 in 0..255, with integer
labels `labels: [N]` in 0..K-1, so the released conventions apply unchanged (book/checkpoints.md,
"Bits per dimension"; Zhai et al. 2024, Sec. 3):

    model input        x = x_int / 255 * 2 - 1                       in [-1, 1]
    training input     x + sigma * eps,  eps ~ N(0, I)              (noise augmentation, train.py)
    likelihood input   x = ((x_int + u) / 256) * 2 - 1,  u ~ U(0, 1)  (uniform dequantisation)

Digits (sklearn.datasets.load_digits: 1797 images of 8 x 8 pixels, 17 grey levels 0..16, 10
classes; shipped with scikit-learn, so no network). A grey level v becomes the 8-bit value

    x_int = round(255 * v / 16)        (0 -> 0 = background -> -1;  16 -> 255 -> +1)

so the levels stay evenly spaced and bits/dim is the released 8-bit figure, comparable in its
definition (not in its value) with the released models. A perfect model of 17-level data would
still pay the dequantisation of each 8-bit value, so the figure is not an entropy of the digits.
The split is fixed: every fifth image (index % 5 == 0) is held out (360 images), the rest
(1437) train.

Image folders: one sub-folder per class (sorted names give the labels 0..K-1). Hidden folders
and files (a name starting with '.', such as .ipynb_checkpoints) are not data; a class folder
without images is an error, since skipping it would shift every later label. 16-bit images
become 8-bit by v >> 8, as Pillow reduces 16-bit RGB (its own conversion of 16-bit grey clips at
255, leaving two levels). An image larger than Pillow's limit for untrusted files
(Image.MAX_IMAGE_PIXELS; a decompression bomb) is refused. Each image is resized so that its
shorter side is S, centre-cropped to S x S (as the recipe does) and kept in memory as uint8. The
recipe's random horizontal flip happens per batch in train.py.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..extras import require

DIGITS_LEVELS = 17
DIGITS_CLASSES = 10
DIGITS_SIZE = 8
HELD_OUT_EVERY = 5
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}   # 'I': how some Pillow versions open 16-bit PNGs
SPLITS = ("train", "test", "all")


def load_digits_split(split: str = "train"):
    """The digits as (images: [N, 1, 8, 8] uint8 in 0..255, labels: [N] int64).

    split: 'train' (1437 images), 'test' (the 360 held-out images, index % 5 == 0) or 'all'.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    digits = require("sklearn.datasets", "the digits data set").load_digits()
    levels = digits.images                                            # [1797, 8, 8] floats 0..16
    images = np.rint(levels * 255 / (DIGITS_LEVELS - 1)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    held_out = np.arange(len(labels)) % HELD_OUT_EVERY == 0
    keep = {"train": ~held_out, "test": held_out, "all": np.ones_like(held_out)}[split]
    return images[keep], labels[keep]


def load_image_folder(root, image_size: int, channels: int = 3):
    """A folder with one sub-folder per class -> (images [N, c, S, S] uint8, labels [N] int64, class names).

    Every image is resized (shorter side = image_size) and centre-cropped; channels 1 keeps grey.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such image folder")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder per class, found none")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = [p for p in sorted((root / name).iterdir())
                 if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()]
        if not files:
            raise ValueError(f"{root / name}: a class folder with no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                             f"the labels follow the sorted folder names, so remove it or add images")
        for path in files:
            images.append(read_image(path, image_size, channels))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


def read_image(path, image_size: int, channels: int) -> np.ndarray:
    """One image file -> [c, S, S] uint8, resized and centre-cropped; a ValueError names a file
    that is no readable image or is larger than Pillow's limit for untrusted files."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = center_crop(to_8_bit(img).convert("L" if channels == 1 else "RGB"), image_size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{path}: refused: {err}") from None
    except OSError as err:                                            # PIL.UnidentifiedImageError too
        raise ValueError(f"{path}: not a readable image ({err})") from None
    pixels = np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)
    return pixels.transpose(2, 0, 1)                                  # [c, S, S]


def to_8_bit(img):
    """A 16-bit grey Pillow image -> 8-bit grey by v >> 8; any other image unchanged."""
    from PIL import Image

    if img.mode not in SIXTEEN_BIT_MODES:
        return img
    values = np.asarray(img).astype(np.int64)
    if values.min() < 0 or values.max() > 0xFFFF:
        raise OSError(f"pixel values {values.min()}..{values.max()} are not 16-bit")
    return Image.fromarray((values >> 8).astype(np.uint8))                # [H, W] uint8: mode L


def center_crop(img, size: int):
    """Resize a PIL image so that its shorter side is `size`, then cut the central size x size square."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_dataset(name: str, image_size: int | None = None, channels: int | None = None):
    """'digits' -> the training digits; anything else is an image folder. Returns (images, labels, K)."""
    if name == "digits":
        if image_size not in (None, DIGITS_SIZE) or channels not in (None, 1):
            raise ValueError(f"the digits are {DIGITS_SIZE}x{DIGITS_SIZE} grey images; "
                             f"got image size {image_size} and {channels} channels")
        images, labels = load_digits_split("train")
        return images, labels, DIGITS_CLASSES
    if image_size is None:
        raise ValueError("an image folder needs an image size")
    images, labels, classes = load_image_folder(name, image_size, 3 if channels is None else channels)
    return images, labels, len(classes)


def to_model_range(images) -> torch.Tensor:
    """uint8 images [N, c, S, S] -> float32 [N, c, S, S] in [-1, 1] (x_int / 255 * 2 - 1)."""
    return torch.as_tensor(np.asarray(images), dtype=torch.float32) / 255 * 2 - 1


def to_unit_range(x):
    """Model-range images (any real values) -> [0, 1] by clipping to [-1, 1], as the released evaluation."""
    return (x.clip(-1, 1) + 1) / 2
