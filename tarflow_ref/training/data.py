"""Image data for training and evaluation: scikit-learn's bundled digits and image folders.

Every data set is held as 8-bit images, `images: [N, c, S, S]` uint8 in 0..255, with integer
labels `labels: [N]` in 0..K-1, so the SPEC's conventions apply unchanged (SPEC, "Bits per
dimension"; Zhai et al. 2024, Sec. 3):

    model input        x = x_int / 255 * 2 - 1                       in [-1, 1]
    training input     x + sigma * eps,  eps ~ N(0, I)              (noise augmentation, train.py)
    likelihood input   x = ((x_int + u) / 256) * 2 - 1,  u ~ U(0, 1)  (uniform dequantisation)

Digits (sklearn.datasets.load_digits: 1797 images of 8 x 8 pixels, 17 grey levels 0..16, 10
classes; shipped with scikit-learn, so no network). A grey level v becomes the 8-bit value

    x_int = round(255 * v / 16)        (0 -> 0 = background -> -1;  16 -> 255 -> +1)

so the levels stay evenly spaced and bits/dim is the SPEC's 8-bit figure, comparable in its
definition (not in its value) with the released models. A perfect model of 17-level data would
still pay the dequantisation of each 8-bit value, so the figure is not an entropy of the digits.
The split is fixed: every fifth image (index % 5 == 0) is held out (360 images), the rest
(1437) train.

Image folders: one sub-folder per class (sorted names give the labels 0..K-1). Each image is
resized so that its shorter side is S, centre-cropped to S x S (as the recipe does) and kept in
memory as uint8. The recipe's random horizontal flip happens per batch in train.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DIGITS_LEVELS = 17
DIGITS_CLASSES = 10
DIGITS_SIZE = 8
HELD_OUT_EVERY = 5
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "test", "all")


def load_digits_split(split: str = "train"):
    """The digits as (images: [N, 1, 8, 8] uint8 in 0..255, labels: [N] int64).

    split: 'train' (1437 images), 'test' (the 360 held-out images, index % 5 == 0) or 'all'.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    from sklearn.datasets import load_digits

    digits = load_digits()
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
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such image folder")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder per class, found none")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    img = center_crop(img.convert("L" if channels == 1 else "RGB"), image_size)
            except OSError as err:                                    # PIL.UnidentifiedImageError too
                raise ValueError(f"{path}: not a readable image ({err})") from None
            pixels = np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)
            images.append(pixels.transpose(2, 0, 1))                  # [c, S, S]
            labels.append(label)
    if not images:
        raise ValueError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


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
