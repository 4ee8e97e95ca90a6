"""`trace`: one row per image: the noise, the image after each flow block in sampling order, the denoised image."""
from .common import (
    CommandError,
    check_drawing_memory,
    check_out,
    default_scale,
    denoiser,
    drawing_guidance,
    labels_for,
    load_model,
    output_options,
    overflow_advice,
    progress,
    save_grid,
    write_outputs,
)


def add(commands, parents):
    return commands.add_parser("trace", parents=[*parents, output_options("trace.png")],
                               help="show the image after every flow block",
                               description="One row per image: the noise, the image after each flow block in "
                                           "sampling order, the denoised image.")


def run(args):
    import torch

    from ..patchify import unpatchify
    from ..torch_backend.sampling import block_inverse, sample
    from ..training.data import to_unit_range

    args.n = 4 if args.n is None else args.n
    check_out(args.out, args.force)
    guidance = drawing_guidance(args)
    model = load_model(args)
    cfg = model.config
    denoise = denoiser(args, cfg)
    per_row = cfg.blocks + (2 if denoise is not None else 1)
    scale = default_scale(args, cfg)
    check_drawing_memory(args, cfg, args.n * per_row, per_row, scale, guidance, batch=args.n)
    labels = labels_for(args, cfg)
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
    if torch.isnan(frames).any():                              # a NaN pixel would be written as garbage
        raise CommandError(f"the trace came out NaN: {overflow_advice(args)}; nothing written")
    pixels = to_unit_range(frames).numpy()
    write_outputs({args.out: lambda path: save_grid(pixels, path, per_row, scale)}, args.force)
    names = ["noise"] + [f"block {b}" for b in reversed(range(cfg.blocks))] + (["denoised"] if args.denoise else [])
    print(f"wrote {args.out} ({args.n} rows; columns: {', '.join(names)})")
