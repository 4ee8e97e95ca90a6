"""The command line: `python -m tarflow_ref {sample,trace,train,bpd,assignments} ...` (console script `tarflow-ref`).

    sample   noise -> images with the sequential (or GS-Jacobi) sampler, guidance, denoising,
             saved as a PNG grid (and optionally .npy); defaults to the bundled digits model
    trace    one row per image: the noise, the image after each flow block in sampling order,
             the denoised image
    train    the released recipe on the digits or an image folder (train.py)
    bpd      bits per dimension of a checkpoint on the digits or an image folder
    assignments release | grade
             student versions of the course assignments; reports and a class table of submissions

Every bad value stops before any work with one line on stderr and exit code 2.
Images leave the model in [-1, 1] (plus the training noise); like the released evaluation,
batches holding NaN are redrawn, values are clipped to [-1, 1] and mapped to [0, 1].
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

MAX_REDRAWS = 10
SMALL_WIDTH = 128


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


def build_parser() -> Parser:
    parser = Parser(prog="tarflow-ref", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    model = Parser(add_help=False)
    model.add_argument("--ckpt", type=Path, help="checkpoint file (released or trained); default: the bundled digits model")
    model.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (default: cpu)")
    model.add_argument("--seed", type=int, default=0, help="random seed of the noise (default: 0)")
    model.add_argument("--threads", type=int, help="CPU threads for torch (default: 1 for models of width "
                       f"<= {SMALL_WIDTH}, whose per-token products are too small to share; else torch's default)")

    draw = Parser(add_help=False)
    draw.add_argument("--n", type=int, help="number of images (default: sample 20, trace 4)")
    draw.add_argument("--class", dest="classes", type=int, nargs="+", metavar="LABEL",
                      help="class label(s), cycled over the images; default: all classes in turn")
    draw.add_argument("--cfg", type=finite, help="classifier-free guidance weight g >= 0 "
                      "(default: the bundled model's recommended weight, else 0)")
    draw.add_argument("--guide-what", choices=["a", "b", "ab"], default="ab",
                      help="guide the log-scale (a), the shift (b) or both (default: ab)")
    draw.add_argument("--annealed", action="store_true", help="anneal the guidance weight along the tokens: g (t+1)/(T-1)")
    draw.add_argument("--attn-temp", type=finite, default=1.0,
                      help="attention temperature of the unconditional branch (default: 1)")
    draw.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=True,
                      help="remove the training noise with one score step (default: on)")
    draw.add_argument("--denoise-factor", type=finite, default=1.0,
                      help="multiplies the step size lambda = B S^2 c sigma^2 (default: 1.0, the theoretical optimum)")
    draw.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    draw.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (default: 64)")
    draw.add_argument("--scale", type=int, help="enlarge each pixel this many times in the PNG "
                      "(default: to at least 64 pixels per image)")

    s = sub.add_parser("sample", parents=[model, draw], help="draw images from a model",
                       description="Draw images from a TarFlow and save them as a PNG grid.")
    s.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG grid to write (default: samples.png)")
    s.add_argument("--npy", type=Path, help="also save the images [n, c, S, S] in [0, 1] as a .npy file")
    s.add_argument("--sampler", choices=["seq", "gsj"], default="seq",
                   help="sequential KV-cache decoding (seq) or GS-Jacobi (gsj) (default: seq)")
    s.add_argument("--strategy", help="GS-Jacobi strategy: a preset name, a list form, the compact "
                   "[Stack-GS-J-Else] form, or 'auto' (default with --sampler gsj: auto)")
    s.add_argument("--cols", type=int, help="images per row of the grid (default: one column per class)")

    t = sub.add_parser("trace", parents=[model, draw], help="show the image after every flow block",
                       description="One row per image: the noise, the image after each flow block in "
                                   "sampling order, the denoised image.")
    t.add_argument("--out", type=Path, default=Path("trace.png"), help="PNG to write (default: trace.png)")

    tr = sub.add_parser("train", help="train a TarFlow by the released recipe",
                        description="Train on the digits or an image folder; writes the checkpoint "
                                    "{dataset}_model_{P}_{C}_{blocks}_{layers}_{sigma}.pth and a .resume.pt beside it.")
    tr.add_argument("--data", default="digits", help="'digits' (scikit-learn, 8x8 grey) or a folder with one sub-folder per class")
    tr.add_argument("--image-size", type=int, help="image size S for a folder (digits: 8)")
    tr.add_argument("--channels", type=int, choices=[1, 3], help="1 (grey) or 3 (RGB); default: 1 for digits, 3 for folders")
    tr.add_argument("--patch", type=int, default=1, help="patch size P (default: 1)")
    tr.add_argument("--width", type=int, default=64, help="model width C, a multiple of 64 (default: 64)")
    tr.add_argument("--blocks", type=int, default=4, help="flow blocks (default: 4)")
    tr.add_argument("--layers", type=int, default=1, help="transformer layers per block (default: 1)")
    tr.add_argument("--sigma", type=finite, default=0.1, help="noise augmentation sigma (default: 0.1)")
    tr.add_argument("--unconditional", action="store_true", help="ignore the labels")
    tr.add_argument("--steps", type=int, default=2000, help="optimiser steps of the whole schedule (default: 2000)")
    tr.add_argument("--stop-after", type=int, help="stop (and save) after this many steps; continue later with --resume")
    tr.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    tr.add_argument("--lr", type=finite, default=1e-3, help="peak learning rate (default: 1e-3)")
    tr.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default: 100)")
    tr.add_argument("--weight-decay", type=finite, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    tr.add_argument("--drop-label", type=finite, default=0.1, help="probability of dropping a label (default: 0.1)")
    tr.add_argument("--flip", action="store_true", help="random horizontal flips (natural images; not digits)")
    tr.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    tr.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (default: cpu)")
    tr.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    tr.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's default)")
    tr.add_argument("--out-dir", type=Path, default=Path("."), help="folder for the checkpoint (default: .)")
    group = tr.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the checkpoint in --out-dir")
    group.add_argument("--force", action="store_true", help="overwrite an existing checkpoint and start over")

    b = sub.add_parser("bpd", parents=[model], help="bits per dimension of a checkpoint on a data set",
                       description="Bits per dimension (SPEC: uniform dequantisation of 8-bit values).")
    b.add_argument("--data", default="digits", help="'digits' or a folder with one sub-folder per class (default: digits)")
    b.add_argument("--split", choices=["train", "test", "all"], default="test",
                   help="digits split (default: test, the 360 held-out images)")
    b.add_argument("--unlabelled", action="store_true", help="score a conditional model without labels (mean class embedding)")
    b.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")

    a = sub.add_parser("assignments", help="hand out and grade the course assignments (assignments/)",
                       description="Student versions of the course assignments, and the grades of students' "
                                   "notebooks.")
    course = a.add_subparsers(dest="action", required=True, parser_class=Parser)
    source = Parser(add_help=False)
    source.add_argument("--source", type=Path, help="the instructor notebook(s): one .ipynb or a folder "
                        "(default: this repository's assignments/)")
    rel = course.add_parser("release", parents=[source], help="write the student versions (solutions removed)")
    rel.add_argument("--out", type=Path, required=True, help="folder for the student notebooks")
    rel.add_argument("--force", action="store_true", help="replace student notebooks already in --out")
    gr = course.add_parser("grade", parents=[source], help="grade students' notebooks: points per part and flags",
                           description="Runs each notebook in a contained kernel (its own user id, no network, "
                                       "limits) and its checks in the grader's process, and prints a report per "
                                       "submission; --out also writes them and the class table (grades.csv).")
    gr.add_argument("submissions", type=Path, nargs="+",
                    help="student notebooks named like the assignment's, or folders of them (one folder per student)")
    gr.add_argument("--timeout", type=int, default=300, help="seconds per cell and per check (default: 300)")
    gr.add_argument("--out", type=Path, help="folder for the reports (reports/) and the class table (grades.csv)")
    gr.add_argument("--force", action="store_true", help="replace reports and a table already in --out")
    gr.add_argument("--resume", action="store_true",
                    help="keep the reports in --out that are still valid, grade the rest")
    gr.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="submissions graded at once (default: the number of cores)")
    gr.add_argument("--allow-reference", action="store_true",
                    help="flagged parts keep their points (the flags are still reported)")
    gr.add_argument("--unsafe", action="store_true", help="grade even where the kernel cannot get fewer rights than "
                    "the grader (not root): fit for grading your own notebook only")
    for command, run in ((s, run_sample), (t, run_trace), (tr, run_train), (b, run_bpd), (rel, run_release),
                         (gr, run_grade)):
        command.set_defaults(run=run, fail=command.error)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.run(args, args.fail)


# ---- shared by the subcommands -------------------------------------------------------------------

def progress(desc, leave=False):
    """A wrapper that shows a tqdm bar while iterating; the tqdm object also takes set_postfix."""
    from tqdm.auto import tqdm
    return lambda items: tqdm(items, desc=desc, leave=leave, dynamic_ncols=True)


def load_model(args, fail):
    """The checkpoint (default: bundled) on the requested device; every problem ends in fail()."""
    import torch

    from .assets import bundled_checkpoint
    from .checkpoint import CheckpointError, load_checkpoint
    from .train import check_device

    try:
        check_device(args.device, getattr(args, "bf16", False))
    except ValueError as err:
        fail(str(err))
    check_threads(args, fail)
    path = args.ckpt if args.ckpt is not None else bundled_checkpoint()
    if not path.is_file():
        fail(f"checkpoint {path} " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    try:
        model = load_checkpoint(path, device=args.device)
    except CheckpointError as err:
        fail(str(err))
    if args.threads is None and model.config.width <= SMALL_WIDTH:
        torch.set_num_threads(1)
    return model


def check_threads(args, fail):
    import torch

    if args.threads is not None:
        if args.threads < 1:
            fail(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def check_draw_args(args, fail):
    """Validate the drawing flags that need no model; returns the Guidance (None when off)."""
    from .assets import BUNDLED_GUIDANCE
    from .guidance import Guidance

    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size), ("--scale", args.scale)):
        if value is not None and value < 1:
            fail(f"{flag} must be at least 1, got {value}")
    if args.denoise_factor < 0:
        fail(f"--denoise-factor must be >= 0, got {args.denoise_factor}")
    weight = args.cfg if args.cfg is not None else (BUNDLED_GUIDANCE if args.ckpt is None else 0.0)
    try:
        guidance = Guidance(weight, args.guide_what, args.annealed, args.attn_temp)
    except ValueError as err:
        fail(str(err))
    return guidance if guidance.active else None


def labels_for(args, cfg, fail):
    """Labels [n] cycling through --class (default: every class), or None for an unconditional model."""
    import torch

    if not cfg.conditional:
        if args.classes is not None:
            fail("this model is unconditional: it takes no --class")
        return None
    bad = [c for c in args.classes or [] if not 0 <= c < cfg.num_classes]
    if bad:
        fail(f"unknown class {bad[0]}: this model has classes 0..{cfg.num_classes - 1}")
    cycle = args.classes or list(range(cfg.num_classes))
    return torch.tensor([cycle[i % len(cycle)] for i in range(args.n)])


def denoiser(args, cfg, fail):
    """The score-denoising step, or None with --no-denoise."""
    if not args.denoise:
        return None
    if cfg.noise_std is None:
        fail("the checkpoint's sigma is unknown (its name does not follow the released pattern); use --no-denoise")
    try:
        from .torch_backend.denoise import denoise
    except ImportError:
        fail("denoising is not available in this installation (tarflow_ref.torch_backend.denoise); use --no-denoise")
    return denoise


def draw_images(model, args, labels, sampler, denoise=None):
    """Images [n, c, S, S] in model range, in batches; a batch holding NaN is drawn again."""
    import torch

    cfg = model.config
    gen = torch.Generator().manual_seed(args.seed)
    out = []
    for start in range(0, args.n, args.batch_size):
        n = min(args.batch_size, args.n - start)
        y = None if labels is None else labels[start:start + n].to(args.device)
        for _ in range(MAX_REDRAWS):
            noise = torch.randn(n, cfg.tokens, cfg.token_dim, generator=gen).to(args.device)
            x = sampler(noise, y)
            if not torch.isnan(x).any():
                break
        else:
            sys.exit(f"tarflow-ref: {MAX_REDRAWS} batches in a row came out NaN; try a lower --cfg")
        if denoise is not None:
            x = denoise(model, x, y, factor=args.denoise_factor, bf16=args.bf16, progress=progress("denoise"))
        out.append(x.detach().float().cpu())
    return torch.cat(out)


def save_grid(images, path: Path, cols: int, scale: int):
    """images: [n, c, S, S] in [0, 1] -> one PNG, `cols` per row, a 1-pixel grey frame, pixels enlarged.
    An existing file at `path` is replaced only once the new PNG is complete."""
    from PIL import Image
    from einops import rearrange

    from .checkpoint import written_atomically

    n, c, S, _ = images.shape
    rows = math.ceil(n / cols)
    canvas = np.full((rows * cols, c, S + 2, S + 2), 0.5)
    canvas[:n, :, 1:-1, 1:-1] = images
    grid = rearrange(canvas, "(r q) c h w -> (r h) (q w) c", r=rows)
    pixels = np.rint(grid * 255).astype(np.uint8)
    img = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    with written_atomically(path) as partial:
        img.save(partial)


def check_out(path: Path, fail, suffix=".png"):
    """Everything that would stop the final write, checked before any sampling."""
    if path.suffix.lower() != suffix:
        fail(f"{path}: the output must be a {suffix} file")
    if not path.parent.is_dir():
        fail(f"{path.parent}: no such folder for the output")
    if path.is_dir():
        fail(f"{path}: is a folder; the output must be a file")
    if not os.access(path.parent, os.W_OK):
        fail(f"{path.parent}: the output folder is not writable")


def check_data(args, fail):
    if args.data != "digits" and not Path(args.data).is_dir():
        fail(f"--data {args.data}: neither 'digits' nor an existing folder")


def default_scale(args, cfg):
    return args.scale if args.scale is not None else max(1, math.ceil(64 / (cfg.image_size + 2)))


# ---- sample ---------------------------------------------------------------------------------------

def run_sample(args, fail):
    from .data import to_unit_range

    args.n = 20 if args.n is None else args.n
    check_out(args.out, fail)
    if args.npy is not None:
        check_out(args.npy, fail, ".npy")
    if args.cols is not None and args.cols < 1:
        fail(f"--cols must be at least 1, got {args.cols}")
    if args.strategy is not None and args.sampler != "gsj":
        fail("--strategy needs --sampler gsj")
    guidance = check_draw_args(args, fail)
    model = load_model(args, fail)
    cfg = model.config
    labels = labels_for(args, cfg, fail)
    denoise = denoiser(args, cfg, fail)
    sampler = make_sampler(args, model, guidance, fail)
    images = to_unit_range(draw_images(model, args, labels, sampler, denoise)).numpy()
    cycle = len(args.classes or range(cfg.num_classes))           # 0 for an unconditional model
    cols = args.cols or (cycle if 0 < cycle <= 16 else math.ceil(math.sqrt(args.n)))
    save_grid(images, args.out, min(cols, args.n), default_scale(args, cfg))
    if args.npy is not None:
        from .checkpoint import written_atomically

        with written_atomically(args.npy) as partial:
            np.save(partial, images.astype(np.float32))
    print(f"wrote {args.out} ({args.n} images{'' if labels is None else ', classes ' + format_classes(args, cfg)})")


def format_classes(args, cfg):
    return " ".join(map(str, args.classes)) if args.classes else f"0..{cfg.num_classes - 1}"


def make_sampler(args, model, guidance, fail):
    """sampler(noise, y) -> image of `model` with `guidance`, with a progress bar over the blocks."""
    cfg = model.config
    if args.sampler == "seq":
        from .torch_backend.sampling import Sampler

        draw = Sampler(model, guidance, args.bf16)     # its engines (CUDA graphs) serve every batch
        return lambda noise, y: draw(noise, y, progress("blocks"))
    try:
        from .strategy import parse_strategy
        from .torch_backend.jacobi import sample_gsj
    except ImportError:
        fail("the GS-Jacobi sampler is not available in this installation; use --sampler seq")
    strategy = args.strategy or "auto"        # 'auto': sample_gsj searches a strategy for this model first
    if strategy.strip() != "auto":
        try:
            strategy = parse_strategy(strategy, cfg)
        except ValueError as err:
            fail(f"--strategy: {err}")
    return lambda noise, y: sample_gsj(model, noise, y, strategy=strategy, guidance=guidance, bf16=args.bf16,
                                       progress=progress("blocks"))


# ---- trace ----------------------------------------------------------------------------------------

def run_trace(args, fail):
    import torch

    from .data import to_unit_range
    from .patchify import unpatchify
    from .torch_backend.sampling import block_inverse

    args.n = 4 if args.n is None else args.n
    check_out(args.out, fail)
    guidance = check_draw_args(args, fail)
    model = load_model(args, fail)
    cfg = model.config
    labels = labels_for(args, cfg, fail)
    denoise = denoiser(args, cfg, fail)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.n, cfg.tokens, cfg.token_dim, generator=gen).to(args.device)
    y = None if labels is None else labels.to(args.device)
    z = noise * model.var.sqrt()
    stages = [z]                                               # each [n, T, D]
    for block in progress("blocks")(list(reversed(model.blocks))):
        z = block_inverse(block, z, y, guidance, args.bf16)
        stages.append(z)
    columns = [unpatchify(s, cfg.patch_size, cfg.channels).float().cpu() for s in stages]   # [n, c, S, S]
    if denoise is not None:
        x = unpatchify(stages[-1], cfg.patch_size, cfg.channels)
        columns.append(denoise(model, x, y, factor=args.denoise_factor, bf16=args.bf16).detach().float().cpu())
    frames = torch.stack(columns, dim=1).flatten(0, 1)        # [n * columns, c, S, S], row by row
    save_grid(to_unit_range(frames).numpy(), args.out, len(columns), default_scale(args, cfg))
    names = ["noise"] + [f"block {b}" for b in reversed(range(cfg.blocks))] + (["denoised"] if args.denoise else [])
    print(f"wrote {args.out} ({args.n} rows; columns: {', '.join(names)})")


# ---- train ----------------------------------------------------------------------------------------

def run_train(args, fail):
    from .train import TrainSettings, train

    digits = args.data == "digits"
    check_data(args, fail)
    if not digits and args.image_size is None:
        fail("training on a folder needs --image-size")
    if args.stop_after is not None and args.stop_after < 1:
        fail(f"--stop-after must be at least 1, got {args.stop_after}")
    check_threads(args, fail)
    try:
        settings = TrainSettings(
            data=args.data, image_size=8 if args.image_size is None else args.image_size,   # digits: 8 only
            channels=args.channels or (1 if digits else 3), patch_size=args.patch, width=args.width,
            blocks=args.blocks, layers=args.layers, noise_std=args.sigma, conditional=not args.unconditional,
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
            weight_decay=args.weight_decay, drop_label=args.drop_label, flip=args.flip, seed=args.seed,
            device=args.device, bf16=args.bf16)
        result = train(settings, args.out_dir, resume=args.resume, force=args.force,
                       stop_after=args.stop_after, progress=progress("train", leave=True))
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        fail(str(err))
    tail = result.losses[-100:]
    print(f"wrote {result.checkpoint} after {result.step} of {settings.steps} steps; "
          f"mean loss of the last {len(tail)} steps {sum(tail) / max(1, len(tail)):.4f}")


# ---- bpd ------------------------------------------------------------------------------------------

def run_bpd(args, fail):
    from .data import load_digits_split, load_image_folder
    from .train import evaluate_bpd

    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    check_data(args, fail)
    model = load_model(args, fail)
    cfg = model.config
    try:
        if args.data == "digits":
            images, labels = load_digits_split(args.split)
            where = f"digits {args.split}"
        else:
            images, labels, _ = load_image_folder(args.data, cfg.image_size, cfg.channels)
            where = args.data
    except ValueError as err:
        fail(str(err))
    if images.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
        fail(f"the data are {list(images.shape[1:])} images, the model takes "
             f"{[cfg.channels, cfg.image_size, cfg.image_size]}")
    use_labels = cfg.conditional and not args.unlabelled
    if use_labels and labels.max() >= cfg.num_classes:
        fail(f"the data have {labels.max() + 1} classes, the model {cfg.num_classes}; use --unlabelled")
    bpd = evaluate_bpd(model, images, labels if use_labels else None, batch_size=args.batch_size,
                       seed=args.seed, progress=progress("bpd"))
    print(f"bits/dim {bpd:.4f} ({where}, {len(images)} images, {'labelled' if use_labels else 'unlabelled'})")


# ---- assignments ----------------------------------------------------------------------------------

def instructor_notebooks(args, fail) -> dict:
    """name -> path of the instructor notebooks in --source (default: the repository's assignments/)."""
    from .grading.course import ASSIGNMENTS, find_notebooks

    source = args.source if args.source is not None else ASSIGNMENTS
    if args.source is None and not source.is_dir():
        fail(f"this installation has no assignments folder ({source}); pass --source")
    try:
        return {path.name: path for path in find_notebooks(source)}
    except ValueError as err:
        fail(str(err))


def run_release(args, fail):
    from .grading.course import release

    sources = instructor_notebooks(args, fail)
    if args.out.exists() and not args.out.is_dir():
        fail(f"--out {args.out}: is a file, not a folder")
    try:
        written = release(sources.values(), args.out, force=args.force)
    except (ValueError, FileExistsError) as err:
        fail(str(err))
    for path in written:
        print(f"wrote {path}")


def run_grade(args, fail):
    from .grading.gradebook import grade_command

    sources = instructor_notebooks(args, fail)
    try:
        grade_command(args.submissions, sources, args.out, jobs=args.jobs, force=args.force, resume=args.resume,
                      timeout=args.timeout, allow_reference=args.allow_reference, unsafe=args.unsafe)
    except (ValueError, FileExistsError) as err:
        fail(str(err))
