"""What a request needs in memory and what the machine has, so that a command refuses a request
that cannot fit before any work, with one line naming both figures, instead of ending in a
MemoryError traceback or in the kernel's out-of-memory killer after minutes of work.

The estimates count only the large arrays a command holds at its peak (bytes), and each count is
at most what the code really allocates: a refused request could not have fitted, and one that
passes may still need somewhat more (Python objects, small temporaries, the activations of one
batch when no gradient is kept).

    images       the drawn images in float32, three copies at the peak: the batches, their
                 concatenation and the [0, 1] copy (common.draw_images, to_unit_range); the
                 labels and the noise are smaller than one copy
    PNG grid     the framed cells as a float64 canvas, two float64 copies of it on the way to
                 8 bits and the 8-bit pixels (common.save_grid), then the enlarged picture as
                 PIL holds it (1 byte per pixel grey, 4 RGB)
    caches       the sampling engine's keys and values of every layer, 2 L B' T C values with
                 B' = 2B under guidance, and its tokens u, x (torch_backend/engine.py)
    training     the weights, their gradients and AdamW's two moments (16 bytes per parameter),
                 and the activations that one batch keeps for the backward pass: at least
                 12 C values per token, layer and block (layer norms, q k v, the attention
                 output, the MLP's 4C hidden values before and after GELU)
"""
from __future__ import annotations

import math
import os
from pathlib import Path

FLOAT32 = 4


def images_bytes(cfg, frames: int) -> int:
    """`frames` images [c, S, S] in float32, three copies."""
    return 3 * frames * cfg.channels * cfg.image_size ** 2 * FLOAT32


def grid_bytes(cfg, frames: int, cols: int, scale: int) -> tuple[int, int]:
    """(the grid at one pixel per pixel, the enlarged PNG picture) for `frames` images in `cols` columns."""
    cells = math.ceil(frames / cols) * cols
    pixels = cells * (cfg.image_size + 2) ** 2                 # the 1-pixel frame on every side
    per_pixel = 1 if cfg.channels == 1 else 4
    return pixels * (cfg.channels * (3 * 8 + 1) + per_pixel), pixels * scale ** 2 * per_pixel


def drawing_needs(cfg, frames: int, cols: int, scale: int) -> dict:
    """Host memory of a command that draws `frames` images into one PNG grid."""
    grid, png = grid_bytes(cfg, frames, cols, scale)
    return {"images": images_bytes(cfg, frames), "PNG grid": grid + png}


def cache_bytes(cfg, batch: int, guided: bool, bf16: bool) -> int:
    """The sampling engine's static buffers for one batch (on the model's device)."""
    rows = batch * (2 if guided else 1)
    cache = 2 * cfg.layers * rows * cfg.tokens * cfg.width * (2 if bf16 else FLOAT32)
    return cache + 2 * batch * cfg.tokens * cfg.token_dim * FLOAT32


def parameter_count(cfg) -> int:
    """Trained parameters of a TarFlow (params.shapes without its buffers, counted without listing
    every key: a request for a million blocks must be refused in no time)."""
    T, C, D, K = cfg.tokens, cfg.width, cfg.token_dim, cfg.num_classes
    layer = 12 * C * C + 13 * C           # two layer norms, qkv, proj, the MLP's two linear layers
    block = T * C + K * C + (D * C + C) + cfg.layers * layer + (C * 2 * D + 2 * D)
    return cfg.blocks * block


def training_needs(cfg, batch: int) -> dict:
    """Memory of one training step on the device (weights, gradients, AdamW, activations)."""
    activations = 12 * batch * cfg.tokens * cfg.width * cfg.layers * cfg.blocks * FLOAT32
    return {"weights, gradients and optimiser": 4 * parameter_count(cfg) * FLOAT32, "activations": activations}


def available_bytes(device: str = "cpu") -> int | None:
    """Bytes free for new allocations: on a CUDA device its free memory; on the host the kernel's
    MemAvailable, within the limit of the process's cgroup (a container); None where unknown."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    figures = [_meminfo_available(), _cgroup_room()]
    known = [f for f in figures if f is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """The cgroup's memory limit minus its usage (cgroup v2, then v1), None without a limit."""
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            text = (Path("/sys/fs/cgroup") / limit).read_text().strip()
            if text == "max" or int(text) >= 1 << 60:
                return None
            return max(0, int(text) - int((Path("/sys/fs/cgroup") / usage).read_text()))
        except (OSError, ValueError):
            continue
    return None


def shortfall(needs: dict, available: int | None) -> str | None:
    """None if `needs` ({what: bytes}) fits in `available`, else a sentence naming the figures."""
    total = sum(needs.values())
    if available is None or total <= available:
        return None
    parts = ", ".join(f"{what} {size_text(size)}" for what, size in needs.items() if size)
    return f"needs about {size_text(total)} of memory ({parts}), but {size_text(available)} are available"


def size_text(n: int) -> str:
    """Bytes for people: '512 B', '3.2 MB', '15 kB', '246 GB', '1200 PB'."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 10 else f"{n:.1f} {unit}"
        n /= 1000
