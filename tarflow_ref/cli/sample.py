"""`sample`: noise -> images by the sequential or the GS-Jacobi sampler, guidance, denoising; a PNG grid."""
import math
from pathlib import Path

import numpy as np

from .common import (
    CommandError,
    at_least_one,
    check_out,
    default_scale,
    denoiser,
    draw_images,
    drawing_guidance,
    labels_for,
    load_model,
    progress,
    save_grid,
)


def add(commands, parents):
    p = commands.add_parser("sample", parents=parents, help="draw images from a model",
                            description="Draw images from a TarFlow and save them as a PNG grid.")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG grid to write (default: samples.png)")
    p.add_argument("--npy", type=Path, help="also save the images [n, c, S, S] in [0, 1] as a .npy file")
    p.add_argument("--cols", type=int, help="images per row of the grid (default: one column per class)")
    return p


def run(args):
    from ..io.checkpoint import written_atomically
    from ..training.data import to_unit_range

    args.n = 20 if args.n is None else args.n
    check_out(args.out)
    if args.npy is not None:
        check_out(args.npy, ".npy")
    at_least_one("--cols", args.cols)
    if args.strategy is not None and args.sampler != "gsj":
        raise CommandError("--strategy needs --sampler gsj")
    guidance = drawing_guidance(args)
    model = load_model(args)
    cfg = model.config
    labels = labels_for(args, cfg)
    denoise = denoiser(args, cfg)
    sampler = make_sampler(args, model, guidance)
    images = to_unit_range(draw_images(model, args, labels, sampler, denoise)).numpy()
    cycle = len(args.classes or range(cfg.num_classes))           # 0 for an unconditional model
    cols = args.cols or (cycle if 0 < cycle <= 16 else math.ceil(math.sqrt(args.n)))
    save_grid(images, args.out, min(cols, args.n), default_scale(args, cfg))
    if args.npy is not None:
        with written_atomically(args.npy) as partial:
            np.save(partial, images.astype(np.float32))
    classes = " ".join(map(str, args.classes)) if args.classes else f"0..{cfg.num_classes - 1}"
    print(f"wrote {args.out} ({args.n} images{'' if labels is None else ', classes ' + classes})")


def make_sampler(args, model, guidance):
    """sampler(noise, y) -> image of `model` with `guidance`, with a progress bar over the blocks."""
    from ..strategy_text import parse_strategy
    from ..torch_backend.jacobi import gs_jacobi
    from ..torch_backend.sampling import Sampler, sample

    if args.sampler == "seq":
        draw = Sampler(model, guidance, args.bf16)     # its engines (CUDA graphs) serve every batch
        return lambda noise, y: draw(noise, y, progress("blocks"))
    strategy = args.strategy or "auto"        # 'auto': the sampler searches a strategy for this model first
    if strategy.strip() != "auto":
        try:
            strategy = parse_strategy(strategy, model.config)
        except ValueError as err:
            raise CommandError(f"--strategy: {err}") from None
    return lambda noise, y: sample(model, noise, y, guidance, sampler=gs_jacobi(strategy), bf16=args.bf16,
                                   progress=progress("blocks"))
