"""`train`: the released recipe on the digits or an image folder (training/train.py)."""
import signal
import sys
from pathlib import Path

from ..validation import SEED_LIMIT
from . import memory
from .common import (
    CommandError,
    check_data,
    check_memory,
    count,
    finite,
    non_negative,
    progress,
    seed,
    set_threads,
    threads,
)


def add(commands, parents):
    p = commands.add_parser("train", parents=parents, help="train a TarFlow by the released recipe",
                            description="Train on the digits or an image folder; writes the checkpoint "
                                        "{dataset}_model_{P}_{C}_{blocks}_{layers}_{sigma}.pth and a .resume.pt "
                                        "beside it.")
    p.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn, 8x8 grey) or a folder with one sub-folder per class")
    p.add_argument("--image-size", type=count, help="image size S for a folder (digits: 8)")
    p.add_argument("--channels", type=int, choices=[1, 3],
                   help="1 (grey) or 3 (RGB); default: 1 for digits, 3 for folders")
    p.add_argument("--patch", type=count, default=1, help="patch size P (default: 1)")
    p.add_argument("--width", type=count, default=64, help="model width C, a multiple of 64 (default: 64)")
    p.add_argument("--blocks", type=count, default=4, help="flow blocks (default: 4)")
    p.add_argument("--layers", type=count, default=1, help="transformer layers per block (default: 1)")
    p.add_argument("--sigma", type=finite, default=0.1, help="noise augmentation sigma (default: 0.1)")
    p.add_argument("--unconditional", action="store_true", help="ignore the labels")
    p.add_argument("--steps", type=count, default=2000, help="optimiser steps of the whole schedule (default: 2000)")
    p.add_argument("--stop-after", type=count,
                   help="stop (and save) after this many steps; continue later with --resume")
    p.add_argument("--batch-size", type=count, default=64, help="images per step (default: 64)")
    p.add_argument("--lr", type=finite, default=1e-3, help="peak learning rate (default: 1e-3)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default: 100)")
    p.add_argument("--weight-decay", type=finite, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    p.add_argument("--drop-label", type=finite, default=0.1, help="probability of dropping a label (default: 0.1)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips (natural images; not digits)")
    p.add_argument("--seed", type=seed, default=0, help=f"random seed, 0..{SEED_LIMIT - 1} (default: 0)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (default: cpu)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--threads", type=threads, help="CPU threads for torch (default: torch's default)")
    p.add_argument("--out-dir", type=Path, default=Path("."), help="folder for the checkpoint (default: .)")
    p.add_argument("--save-every", type=count, metavar="STEPS",
                   help="also write the checkpoint every STEPS steps (default: by time only)")
    p.add_argument("--save-minutes", type=non_negative, metavar="MINUTES",
                   help="write the checkpoint every MINUTES minutes, 0 for never (default: train.SAVE_MINUTES, "
                        "5); it is always written at the end and when Ctrl-C or SIGTERM stops the run")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the checkpoint in --out-dir")
    group.add_argument("--force", action="store_true", help="overwrite an existing checkpoint and start over")
    return p


def run(args):
    from ..training.train import SAVE_MINUTES, TrainSettings, train

    digits = args.data == "digits"
    check_data(args)
    if not digits and args.image_size is None:
        raise CommandError("training on a folder needs --image-size")
    try:
        settings = TrainSettings(
            data=args.data, image_size=8 if args.image_size is None else args.image_size,   # digits: 8 only
            channels=args.channels or (1 if digits else 3), patch_size=args.patch, width=args.width,
            blocks=args.blocks, layers=args.layers, noise_std=args.sigma, conditional=not args.unconditional,
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
            weight_decay=args.weight_decay, drop_label=args.drop_label, flip=args.flip, seed=args.seed,
            device=args.device, bf16=args.bf16)
    except ValueError as err:
        raise CommandError(str(err)) from None
    check_memory({}, args.device, memory.training_needs(settings.model_config(0), settings.batch_size),
                 hint="use a smaller --batch-size or model (--width, --blocks, --layers, --patch)")
    set_threads(args)
    try:
        result = train(settings, args.out_dir, resume=args.resume, force=args.force, stop_after=args.stop_after,
                       progress=progress("train", leave=True), save_every=args.save_every,
                       save_minutes=SAVE_MINUTES if args.save_minutes is None else args.save_minutes or None)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        raise CommandError(str(err)) from None
    if result.interrupted:
        print(f"stopped by {result.interrupted} after {result.step} of {settings.steps} steps; "
              + (f"{result.checkpoint} holds them: continue with --resume" if result.step else "nothing written"))
        sys.exit(128 + signal.Signals[result.interrupted].value)
    tail = result.losses[-100:]
    print(f"wrote {result.checkpoint} after {result.step} of {settings.steps} steps; "
          f"mean loss of the last {len(tail)} steps {sum(tail) / max(1, len(tail)):.4f}")
