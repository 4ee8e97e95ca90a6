"""`fid` and `fid-stats`: argument checks and printing only; the work is in evaluation/fid.py
(statistics, runs), torch_backend/draw.py (batches of samples) and registry.py (released names).

    fid        FID of N samples of a checkpoint (any sampler and setting of `sample`), or of a folder /
               .npy / .npz of images, against a statistics file; resumable with --state
    fid-stats  a statistics file in the released layout from a folder of real images (or the digits)
"""
from __future__ import annotations

import time
from pathlib import Path

from .common import (
    CommandError,
    Parser,
    check_out,
    count,
    denoiser,
    drawing_guidance,
    labels_for,
    load_model,
    progress,
    sample_stream,
    set_threads,
    threads,
)
from .sample import make_sampler

FID_N = 1000


def add(commands, parents):
    """`fid` (parents: the model, drawing and solver flags of `sample`) and `fid-stats`."""
    run = Parser(add_help=False)
    run.add_argument("--state", type=Path, help="save the run here every --save-every batches; a run with the "
                     "same file continues where it stopped (same settings only)")
    run.add_argument("--save-every", type=count, default=10, help="batches between saves of --state (default: 10; "
                     "under torchrun rounded up to whole rounds of one batch per process)")
    run.add_argument("--stop-after", type=count, help="stop after this many batches (state saved; under torchrun "
                     "rounded up to whole rounds); run again to continue")
    run.add_argument("--force", action="store_true", help="start over: ignore --state's saved run, replace --out")
    run.add_argument("--image-size", type=count, help="resize (shorter side) and centre-crop image files to this size")

    f = commands.add_parser("fid", parents=[*parents, run], help="FID of samples or images against a statistics file",
                            description=f"FID of --num-images (default {FID_N}) samples of a checkpoint, or of "
                                        "--images, against a statistics file (released or made by fid-stats); "
                                        "prints FID, images, seconds spent sampling and images per second.")
    f.add_argument("--stats", help="statistics file or released name (afhq256, imagenet128, ...); default: the "
                   "released model's own, or the bundled digits' file for the bundled model")
    f.add_argument("--images", type=Path, help="score these instead of sampling: a folder of image files, "
                   "a .npy or a .npz (uint8, or floats in [0, 1])")
    f.add_argument("--published", action="store_true", help="the released model's published setting: "
                   "guidance weight, tau_u, denoising factor and (with --sampler gsj) strategy")

    st = commands.add_parser("fid-stats", parents=[run], help="a statistics file from real images",
                             description="FID statistics of real images in the released layout, with the feature "
                                         "network of --features.")
    st.add_argument("--data", required=True, help="a folder of image files (sub-folders included), a .npy / .npz, "
                    "or 'digits'")
    st.add_argument("--split", choices=["train", "test", "all"], default="test", help="digits split (default: test)")
    st.add_argument("--features", help="the statistics file (or released name) whose feature network to use; "
                    "default for the digits: the bundled digits' file")
    st.add_argument("--out", type=Path, required=True, help="statistics file to write (.pth)")
    st.add_argument("--batch-size", type=count, default=100, help="images per batch (default: 100)")
    st.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (default: cpu)")
    st.add_argument("--threads", type=threads, help="CPU threads for torch (default: torch's default)")
    return {f: run_fid, st: run_fid_stats}


def run_fid(args):
    from ..registry import find_release

    check_run_args(args)
    args.n = FID_N if args.n is None else args.n
    release = find_release(args.ckpt) if args.ckpt is not None else None
    if args.published:
        use_published(args, release)
    if args.images is not None and args.ckpt is not None:
        raise CommandError("--images and --ckpt exclude each other: score files, or sample a checkpoint")
    guidance = drawing_guidance(args) if args.images is None else None
    stats_name = args.stats or default_stats(args, release)
    set_threads(args)
    reference, network = read_reference(stats_name, args.device)
    if args.images is not None:
        source, search = images_source(args, network), 0.0
        settings = {"images": args.images.resolve(), "image_size": args.image_size, "batch_size": args.batch_size}
    else:
        source, settings, search = sampled_source(args, guidance)
    settings["stats"] = Path(stats_name).name
    result = run_accumulate(args, source, network, settings, progress("fid", leave=True))
    if stopped(result, source, args):
        return
    fid = result.stats.frechet_distance(reference)
    what = "images read" if args.images is not None else "sampling"
    print(f"FID {fid:.4f}  ({result.stats.n} images against {Path(stats_name).name}: {reference.n} images; "
          f"{what} {result.seconds:.1f} s, {result.images_per_second:.1f} images/s"
          + (f"; strategy search {search:.1f} s" if search else "") + ")")


def check_run_args(args):
    from ..training.train import check_device

    try:
        check_device(args.device, getattr(args, "bf16", False))
    except ValueError as err:
        raise CommandError(str(err)) from None
    if args.stop_after is not None and args.state is None:
        raise CommandError("--stop-after needs --state (where the stopped run is saved)")
    if args.state is not None and not args.state.parent.is_dir():
        raise CommandError(f"--state {args.state}: no such folder")


def use_published(args, release):
    """--published: the preset's guidance, tau_u, denoising factor and strategy, refusing flags it replaces."""
    from ..strategy import PRESETS

    preset = None if release is None else PRESETS.get(release.name)
    if preset is None:
        names = ", ".join(dict.fromkeys(p.name for p in PRESETS.values()))
        raise CommandError(f"--published: no published setting for this checkpoint (published: {names})")
    if args.cfg is not None or args.strategy is not None or args.attn_temp != 1.0 or args.denoise_factor != 1.0:
        raise CommandError("--published sets --cfg, --attn-temp, --denoise-factor and --strategy; "
                           "drop them or --published")
    args.cfg, args.attn_temp = preset.guidance.weight, preset.guidance.temperature
    args.guide_what, args.annealed = preset.guidance.what, preset.guidance.annealed
    args.denoise_factor = preset.denoise_factor
    if args.sampler == "gsj":
        args.strategy = preset.name


def default_stats(args, release) -> str:
    if release is not None:
        return release.stats
    if args.ckpt is None and args.images is None:
        return "digits"
    raise CommandError("--stats is needed: the statistics file (a path, a released name, or 'digits') to compare with")


def read_reference(stats_name, device):
    """(FeatureStats, feature network) of a statistics file, a released name or 'digits' (the bundled file)."""
    from ..assets import bundled_fid_stats
    from ..evaluation.fid import StatsFileError, read_stats_file
    from ..registry import ReleaseError, resolve

    try:
        path = bundled_fid_stats() if stats_name == "digits" else resolve(stats_name, "stats")
        return read_stats_file(path, device)
    except (ReleaseError, StatsFileError) as err:
        raise CommandError(str(err)) from None


def images_source(args, network):
    from ..evaluation.fid import read_images

    try:
        return read_images(args.images, network.channels, args.image_size, args.batch_size)
    except ValueError as err:
        raise CommandError(str(err)) from None


def sampled_source(args, guidance):
    """The sample command's machinery: model, labels, denoiser, sampler -> (SampleStream, settings, search s)."""
    if args.strategy is not None and args.sampler != "gsj":
        raise CommandError("--strategy needs --sampler gsj")
    model = load_model(args)
    labels = labels_for(args, model.config)
    denoise = denoiser(args, model.config)
    search = 0.0
    if args.sampler == "gsj" and (args.strategy or "auto").strip() == "auto":
        # one search for the whole run (the sample command searches per batch, with that batch's labels)
        from ..torch_backend import distributed
        from ..torch_backend.strategy_search import auto_strategy

        start = time.perf_counter()
        try:        # found by rank 0 for all, so that every rank draws its batches with one strategy
            args.strategy = distributed.on_main(lambda: auto_strategy(
                model, None if labels is None else labels[:8].to(args.device), guidance).to_text())
        except ValueError as err:
            raise CommandError(f"--strategy auto: {err}") from None
        search = time.perf_counter() - start
    sampler = make_sampler(args, model, guidance)
    print(f"sampler: {args.sampler}" + (f" {args.strategy}" if args.sampler == "gsj" else "")
          + f"; {sampler_steps(args, model)} sequential steps per batch")
    settings = {k: getattr(args, k) for k in ("n", "batch_size", "seed", "classes", "cfg", "guide_what", "annealed",
                                              "attn_temp", "denoise", "denoise_factor", "bf16", "sampler",
                                              "strategy", "device")}
    settings.update(ckpt=args.ckpt or "bundled", cfg=guidance.weight if guidance else 0.0)     # the weight in effect
    return sample_stream(model, args, labels, sampler, denoise), settings, search


def sampler_steps(args, model) -> int:
    """Sequential transformer calls of one batch: N (T - 1) for seq, the strategy's count for gsj."""
    from ..strategy import Strategy
    from ..strategy_text import parse_strategy

    cfg = model.config
    strategy = parse_strategy(args.strategy, cfg) if args.sampler == "gsj" else Strategy.uniform(cfg.blocks, 0, 1)
    return strategy.cost(cfg).steps


def run_accumulate(args, source, network, settings, progress):
    from ..evaluation.fid import StatsFileError, accumulate
    from ..torch_backend.draw import NanSamples

    try:
        return accumulate(source, network, state_path=args.state, settings=settings, save_every=args.save_every,
                          stop_after=args.stop_after, restart=args.force, progress=progress)
    except (StatsFileError, ValueError) as err:
        raise CommandError(str(err)) from None
    except NanSamples as err:
        raise CommandError(f"{err}; try a lower --cfg") from None


def stopped(result, source, args) -> bool:
    """Say so when --stop-after ended the run early."""
    if not result.complete:
        print(f"stopped after {result.stats.n} of {source.n} images; the run is saved in {args.state}: "
              f"run the same command again to continue")
    return not result.complete


def run_fid_stats(args):
    from ..evaluation.fid import ArrayImages, read_images, write_stats_file
    from ..torch_backend import distributed
    from ..training.data import load_digits_split

    check_run_args(args)
    check_out(args.out, args.force, ".pth")
    if args.features is None and args.data != "digits":
        raise CommandError("--features is needed: the statistics file (or released name) whose feature network "
                           "to use")
    set_threads(args)
    _, network = read_reference(args.features or "digits", args.device)
    try:
        if args.data == "digits":
            source = ArrayImages(load_digits_split(args.split)[0], args.batch_size)
        else:
            source = read_images(args.data, network.channels, args.image_size, args.batch_size)
    except ValueError as err:
        raise CommandError(str(err)) from None
    settings = {"data": args.data if args.data == "digits" else Path(args.data).resolve(), "split": args.split,
                "image_size": args.image_size, "batch_size": args.batch_size, "features": args.features}
    result = run_accumulate(args, source, network, settings, progress("fid-stats", leave=True))
    if stopped(result, source, args):
        return
    if result.stats.n < 2:
        raise CommandError(f"{args.data}: {result.stats.n} image; statistics need at least 2")
    if distributed.is_main():
        write_stats_file(args.out, result.stats, network)
    print(f"wrote {args.out} ({result.stats.n} images, {result.stats.dim} features)")
