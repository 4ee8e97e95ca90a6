"""What the commands share: the one error type, the argument parser, the checks of every flag,
loading the model and labels, drawing in batches and writing the outputs.

Every check of what a user gives runs before any work, and a failure is one line on stderr with
exit code 2, in one of two places:

* a flag's own value: its argparse type below (`count`, `seed`, `threads`, `finite`,
  `non_negative`), so argparse answers "argument --n: must be at least 1, got -3" before anything
  else runs;
* what depends on other flags, on files or on the machine: the functions below, each raising
  CommandError, called by the command's `run` before the work: `check_out` (an output file: its
  suffix and folder, and --force for one that exists), `check_memory` (memory.py's estimate
  against what the machine has), `load_model` (device, threads, the checkpoint), `labels_for`,
  `drawing_guidance`, `check_data`.

A new command reuses each in one call: `parents=[model_options()]` gives --ckpt, --device, --seed
and --threads with their types, `drawing_options()` the drawing flags, `output_options(default,
suffix)` --out and --force; in `run`, `check_out(args.out, args.force)`, then `load_model(args)`,
`check_memory(needs, args.device)` with the figures of memory.py, and at the end
`write_outputs({path: writer}, args.force)`, which writes every output file of the command as one
group (io/files.py: atomic, never replacing without --force, all files or none).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np

from ..validation import SEED_LIMIT
from . import memory

SMALL_WIDTH = 128


class CommandError(Exception):
    """A bad value: `main` prints it as one line on stderr and exits with code 2, before any work."""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is ONE line on stderr (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def finite(text: str) -> float:
    """argparse type of every real-valued flag: nan or inf would pass the range checks unnoticed."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got '{text}'")
    return value


def non_negative(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: '{text}'") from None


def count(text: str) -> int:
    """argparse type of every count and size (images, batch size, steps, scale, columns): >= 1."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed(text: str) -> int:
    """argparse type of --seed: 0 .. 2^32 - 1 (validation.check_seed), before a model is loaded."""
    value = integer(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in 0..{SEED_LIMIT - 1}, got {value}")
    return value


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads(text: str) -> int:
    """argparse type of --threads: at most the CPUs this process may use (torch crashes when asked
    for tens of thousands of threads, and more threads than CPUs only slow it down)."""
    value, cpus = integer(text), usable_cpus()
    if not 1 <= value <= cpus:
        raise argparse.ArgumentTypeError(f"must be in 1..{cpus} (the CPUs this process may use), got {value}")
    return value


def model_options() -> Parser:
    """--ckpt, --device, --seed, --threads: the flags of every command that loads a checkpoint."""
    model = Parser(add_help=False)
    model.add_argument("--ckpt", type=Path, help="checkpoint file (released or trained) or a released name "
                       "(afhq256, imagenet128, ...: tarflow_ref/registry.py); default: the bundled digits model")
    model.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (default: cpu)")
    model.add_argument("--seed", type=seed, default=0, help=f"random seed of the noise, 0..{SEED_LIMIT - 1} "
                       "(default: 0)")
    model.add_argument("--threads", type=threads, help="CPU threads for torch (default: 1 for models of width "
                       f"<= {SMALL_WIDTH}, whose per-token products are too small to share; else torch's default)")
    return model


def output_options(default: str, suffix: str = ".png", what: str = "PNG") -> Parser:
    """--out (default `default`) and --force, the flags of a command that writes a file."""
    out = Parser(add_help=False)
    out.add_argument("--out", type=Path, default=Path(default), help=f"{what} to write (default: {default})")
    out.add_argument("--force", action="store_true", help="replace output files that exist (default: refuse)")
    return out


def drawing_options() -> Parser:
    """The flags of the commands that draw images: count, classes, guidance, denoising, precision."""
    draw = Parser(add_help=False)
    draw.add_argument("--num-images", dest="n", type=count, metavar="N",
                      help="number of images (default: sample 20, trace 4); also --n, but not under torchrun, "
                           "which takes --n for an abbreviation of its own flags")
    draw.add_argument("--n", dest="n", type=count, help=argparse.SUPPRESS)
    draw.add_argument("--class", dest="classes", type=int, nargs="+", metavar="LABEL",
                      help="class label(s), cycled over the images; default: all classes in turn")
    draw.add_argument("--cfg", type=finite, help="classifier-free guidance weight g >= 0 "
                      "(default: the bundled model's recommended weight, else 0)")
    draw.add_argument("--guide-what", choices=["a", "b", "ab"], default="ab",
                      help="guide the log-scale (a), the shift (b) or both (default: ab)")
    draw.add_argument("--annealed", action="store_true",
                      help="anneal the guidance weight along the tokens: g (t+1)/(T-1)")
    draw.add_argument("--attn-temp", type=finite, default=1.0,
                      help="attention temperature of the unconditional branch (default: 1)")
    draw.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=True,
                      help="remove the training noise with one score step (default: on)")
    draw.add_argument("--denoise-factor", type=non_negative, default=1.0,
                      help="multiplies the step size lambda = B S^2 c sigma^2 (default: 1.0, the theoretical optimum)")
    draw.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    draw.add_argument("--batch-size", type=count, default=64, help="images per sampling batch (default: 64)")
    draw.add_argument("--scale", type=count, help="enlarge each pixel this many times in the PNG "
                      "(default: to at least 64 pixels per image)")
    return draw


def solver_options() -> Parser:
    """--sampler, --strategy: how the commands that sample invert the flow."""
    solver = Parser(add_help=False)
    solver.add_argument("--sampler", choices=["seq", "gsj"], default="seq",
                        help="sequential KV-cache decoding (seq) or GS-Jacobi (gsj) (default: seq)")
    solver.add_argument("--strategy", help="GS-Jacobi strategy: a preset name, a list form, the compact "
                        "[Stack-GS-J-Else] form, or 'auto' (default with --sampler gsj: auto)")
    return solver


def progress(desc, leave=False):
    """A wrapper that shows a tqdm bar while iterating (on rank 0 only under torchrun); the tqdm
    object also takes set_postfix."""
    from tqdm.auto import tqdm

    from ..torch_backend import distributed
    return lambda items: tqdm(items, desc=desc, leave=leave, dynamic_ncols=True, disable=not distributed.is_main())


def set_threads(args):
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)


def load_model(args):
    """The checkpoint (default: bundled) on the requested device."""
    import torch

    from ..assets import bundled_checkpoint
    from ..io.checkpoint import CheckpointError, load_checkpoint
    from ..registry import ReleaseError, find_release, resolve
    from ..training.train import check_device

    try:
        check_device(args.device, getattr(args, "bf16", False))
    except ValueError as err:
        raise CommandError(str(err)) from None
    set_threads(args)
    path = args.ckpt if args.ckpt is not None else bundled_checkpoint()
    if not path.is_file() and find_release(path) is not None:      # a released name: the cache, else the hub
        try:
            path = resolve(path, "checkpoint")
        except ReleaseError as err:
            raise CommandError(str(err)) from None
    if not path.is_file():
        raise CommandError(f"checkpoint {path} " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    if not os.access(path, os.R_OK):
        raise CommandError(f"checkpoint {path} is not readable (permission denied)")
    try:
        model = load_checkpoint(path, device=args.device)
    except CheckpointError as err:
        raise CommandError(str(err)) from None
    if args.threads is None and model.config.width <= SMALL_WIDTH:
        torch.set_num_threads(1)
    return model


def drawing_guidance(args):
    """Validate the drawing flags that need no model; returns the Guidance (None when off)."""
    from ..assets import BUNDLED_GUIDANCE
    from ..guidance import Guidance

    weight = args.cfg = args.cfg if args.cfg is not None else (BUNDLED_GUIDANCE if args.ckpt is None else 0.0)
    try:
        guidance = Guidance(weight, args.guide_what, args.annealed, args.attn_temp)
    except ValueError as err:
        raise CommandError(str(err)) from None
    return guidance if guidance.active else None


def labels_for(args, cfg):
    """Labels [n] cycling through --class (default: every class), or None for an unconditional model."""
    import torch

    if not cfg.conditional:
        if args.classes is not None:
            raise CommandError("this model is unconditional: it takes no --class")
        return None
    bad = [c for c in args.classes or [] if not 0 <= c < cfg.num_classes]
    if bad:
        raise CommandError(f"unknown class {bad[0]}: this model has classes 0..{cfg.num_classes - 1}")
    cycle = args.classes or list(range(cfg.num_classes))
    return torch.tensor([cycle[i % len(cycle)] for i in range(args.n)])


def denoiser(args, cfg):
    """The score-denoising step, or None with --no-denoise."""
    if not args.denoise:
        return None
    if cfg.noise_std is None:
        raise CommandError("the checkpoint's sigma is unknown (its name does not follow the released pattern); "
                           "use --no-denoise")
    from ..torch_backend.denoising import denoise

    return denoise


def draw_images(model, args, labels, sampler, denoise=None):
    """Images [n, c, S, S] in model range, in batches; a batch holding NaN (after denoising, when
    on) is drawn again, up to torch_backend/draw.MAX_REDRAWS times. Under torchrun each rank draws
    every W-th batch and rank 0 gets them all, in order (the others get None)."""
    import torch

    from ..torch_backend import distributed
    from ..torch_backend.draw import NanSamples

    stream = sample_stream(model, args, labels, sampler, denoise)
    starts = stream.starts()
    try:
        own = {start: stream.batch(start) for start in starts[distributed.rank()::distributed.world_size()]}
    except NanSamples as err:
        raise CommandError(f"{err}: {overflow_advice(args)}; nothing written") from None
    parts = distributed.gather_to_main(own)
    if parts is None:
        return None
    batches = {start: x for part in parts for start, x in part.items()}
    return torch.cat([batches[start] for start in starts])


def sample_stream(model, args, labels, sampler, denoise=None):
    """The --num-images images of the drawing flags as a SampleStream (torch_backend/draw.py)."""
    from ..torch_backend.draw import SampleStream

    def denoised(x, y):
        return denoise(model, x, y, factor=args.denoise_factor, bf16=args.bf16, progress=progress("denoise"))
    return SampleStream(sampler, model.config, args.n, args.batch_size, labels, args.seed, args.device,
                        None if denoise is None else denoised)


def overflow_advice(args) -> str:
    """Why samples come out NaN, and what to try."""
    if args.cfg:
        return "the model overflows at this guidance weight; try a lower --cfg"
    return "the model overflows on this noise (are its weights trained?)"


def save_grid(images, path: Path, cols: int, scale: int):
    """images: [n, c, S, S] in [0, 1] -> one PNG at `path` (write_outputs gives the temporary one),
    `cols` per row, a 1-pixel grey frame, pixels enlarged."""
    from einops import rearrange
    from PIL import Image

    n, c, S, _ = images.shape
    rows = math.ceil(n / cols)
    canvas = np.full((rows * cols, c, S + 2, S + 2), 0.5)
    canvas[:n, :, 1:-1, 1:-1] = images
    grid = rearrange(canvas, "(r q) c h w -> (r h) (q w) c", r=rows)
    pixels = np.rint(grid * 255).astype(np.uint8)
    img = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(path)


def check_out(path: Path, force: bool, suffix=".png"):
    """Everything that would stop the final write, checked before any work: the suffix, the
    folder, and an existing file, which only --force may replace."""
    if path.suffix.lower() != suffix:
        raise CommandError(f"{path}: the output must be a {suffix} file")
    if not path.parent.is_dir():
        raise CommandError(f"{path.parent}: no such folder for the output")
    if path.is_dir():
        raise CommandError(f"{path}: is a folder; the output must be a file")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise CommandError(f"{path.parent}: the output folder is not writable")
    if os.path.lexists(path) and not force:
        raise CommandError(f"{path} exists; pass --force to replace it")


def write_outputs(writers: dict, force: bool):
    """Write the outputs {path: write(partial path)} as one group (io/files.written_together):
    atomically, all or none, never replacing a file without --force, even one that another run
    wrote while this one worked. A failed write (a full disk) is one line; no output changed."""
    from ..io.files import OutputExists, written_together

    try:
        with written_together(list(writers), force=force) as partials:
            for write, partial in zip(writers.values(), partials):
                write(partial)
    except OutputExists as err:
        raise CommandError(f"{err}: pass --force to replace it") from None
    except OSError as err:
        raise CommandError(f"cannot write {', '.join(map(str, writers))} ({err.strerror or err}); nothing was "
                           "written and existing files are unchanged") from None


def check_memory(needs: dict, device: str = "cpu", device_needs: dict | None = None, hint: str = ""):
    """CommandError unless `needs` ({what: bytes} in host memory) fit in what the machine has,
    and `device_needs` in the memory of `device` (on the CPU both count against the host)."""
    host, device_needs = dict(needs), dict(device_needs or {})
    if not device.startswith("cuda"):
        host, device_needs = host | device_needs, {}
    for where, wants in (("cpu", host), (device, device_needs)):
        if wants:
            problem = memory.shortfall(wants, memory.available_bytes(where))
            if problem:
                place = "" if where == "cpu" else f" on {where}"
                raise CommandError(f"this request {problem}{place}" + (f"; {hint}" if hint else ""))


def check_drawing_memory(args, cfg, frames: int, cols: int, scale: int, guidance, batch: int | None = None):
    """check_memory for a command that draws `frames` images into one PNG grid, sampling `batch`
    at a time (default: --batch-size)."""
    batch = min(args.batch_size, args.n) if batch is None else batch
    check_memory(memory.drawing_needs(cfg, frames, cols, scale), args.device,
                 {"caches": memory.cache_bytes(cfg, batch, guidance is not None, args.bf16)},
                 hint="ask for fewer or smaller images (--n, --scale, --batch-size)")


def check_data(args):
    if args.data != "digits" and not Path(args.data).is_dir():
        raise CommandError(f"--data {args.data}: neither 'digits' nor an existing folder")


def default_scale(args, cfg):
    return args.scale if args.scale is not None else max(1, math.ceil(64 / (cfg.image_size + 2)))
