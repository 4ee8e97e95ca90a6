"""`sample`: noise -> images by the sequential or the GS-Jacobi sampler, guidance, denoising; a PNG grid."""
import math
from pathlib import Path

import numpy as np

from .common import (
    CommandError,
    check_drawing_memory,
    check_out,
    count,
    default_scale,
    denoiser,
    draw_images,
    drawing_guidance,
    labels_for,
    load_model,
    output_options,
    progress,
    save_grid,
    write_outputs,
)


def add(commands, parents):
    p = commands.add_parser("sample", parents=[*parents, output_options("samples.png", what="PNG grid")],
                            help="draw images from a model",
                            description="Draw images from a TarFlow and save them as a PNG grid.")
    p.add_argument("--npy", type=Path, help="also save the images [n, c, S, S] in [0, 1] as a .npy file "
                   "(written together with the PNG: both or neither)")
    p.add_argument("--cols", type=count, help="images per row of the grid (default: one column per class)")
    return p


def run(args):
    from ..training.data import to_unit_range

    args.n = 20 if args.n is None else args.n
    check_out(args.out, args.force)
    if args.npy is not None:
        check_out(args.npy, args.force, ".npy")
    if args.strategy is not None and args.sampler != "gsj":
        raise CommandError("--strategy needs --sampler gsj")
    guidance = drawing_guidance(args)
    model = load_model(args)
    cfg = model.config
    denoise = denoiser(args, cfg)
    cycle = len(args.classes or range(cfg.num_classes))           # 0 for an unconditional model
    cols = min(args.cols or (cycle if 0 < cycle <= 16 else math.ceil(math.sqrt(args.n))), args.n)
    scale = default_scale(args, cfg)
    check_drawing_memory(args, cfg, args.n, cols, scale, guidance)
    labels = labels_for(args, cfg)
    sampler = make_sampler(args, model, guidance)
    images = draw_images(model, args, labels, sampler, denoise)
    if images is None:                          # a rank other than 0 under torchrun: rank 0 writes
        return
    images = to_unit_range(images).numpy()
    writers = {args.out: lambda path: save_grid(images, path, cols, scale)}
    if args.npy is not None:
        writers[args.npy] = lambda path: np.save(path, images.astype(np.float32))
    write_outputs(writers, args.force)
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
