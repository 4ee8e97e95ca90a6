"""`trace`: one row per image: the noise, the image after each flow block in sampling order, the denoised image."""
from pathlib import Path

from .common import check_out, default_scale, denoiser, drawing_guidance, labels_for, load_model, progress, save_grid


def add(commands, parents):
    p = commands.add_parser("trace", parents=parents, help="show the image after every flow block",
                            description="One row per image: the noise, the image after each flow block in "
                                        "sampling order, the denoised image.")
    p.add_argument("--out", type=Path, default=Path("trace.png"), help="PNG to write (default: trace.png)")
    return p


def run(args):
    import torch

    from ..patchify import unpatchify
    from ..torch_backend.sampling import block_inverse, sample
    from ..training.data import to_unit_range

    args.n = 4 if args.n is None else args.n
    check_out(args.out)
    guidance = drawing_guidance(args)
    model = load_model(args)
    cfg = model.config
    labels = labels_for(args, cfg)
    denoise = denoiser(args, cfg)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.n, cfg.tokens, cfg.token_dim, generator=gen).to(args.device)
    y = None if labels is None else labels.to(args.device)
    stages = []                                                # tokens [n, T, D] before and after each block

    def keep_stages(model, z, y, guidance, *, bf16, progress):
        stages.append(z)
        for block in progress(list(reversed(model.blocks))):
            stages.append(z := block_inverse(block, z, y, guidance, bf16))
        return z
    x = sample(model, noise, y, guidance, sampler=keep_stages, bf16=args.bf16, progress=progress("blocks"))
    columns = [unpatchify(s, cfg.patch_size, cfg.channels).float().cpu() for s in stages]   # [n, c, S, S]
    if denoise is not None:
        columns.append(denoise(model, x, y, factor=args.denoise_factor, bf16=args.bf16).detach().float().cpu())
    frames = torch.stack(columns, dim=1).flatten(0, 1)        # [n * columns, c, S, S], row by row
    save_grid(to_unit_range(frames).numpy(), args.out, len(columns), default_scale(args, cfg))
    names = ["noise"] + [f"block {b}" for b in reversed(range(cfg.blocks))] + (["denoised"] if args.denoise else [])
    print(f"wrote {args.out} ({args.n} rows; columns: {', '.join(names)})")
