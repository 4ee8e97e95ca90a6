"""`bpd`: bits per dimension of a checkpoint on the digits or an image folder (logdet.py)."""
from .common import CommandError, check_data, count, load_model, progress


def add(commands, parents):
    p = commands.add_parser("bpd", parents=parents, help="bits per dimension of a checkpoint on a data set",
                            description="Bits per dimension (uniform dequantisation of 8-bit values; "
                                        "book/checkpoints.md, \"Bits per dimension\").")
    p.add_argument("--data", default="digits",
                   help="'digits' or a folder with one sub-folder per class (default: digits)")
    p.add_argument("--split", choices=["train", "test", "all"], default="test",
                   help="digits split (default: test, the 360 held-out images)")
    p.add_argument("--unlabelled", action="store_true",
                   help="score a conditional model without labels (mean class embedding)")
    p.add_argument("--batch-size", type=count, default=256, help="images per forward pass (default: 256)")
    return p


def run(args):
    from ..training.data import load_digits_split, load_image_folder
    from ..training.train import evaluate_bpd

    check_data(args)
    model = load_model(args)
    cfg = model.config
    try:
        if args.data == "digits":
            images, labels = load_digits_split(args.split)
            where = f"digits {args.split}"
        else:
            images, labels, _ = load_image_folder(args.data, cfg.image_size, cfg.channels)
            where = args.data
    except ValueError as err:
        raise CommandError(str(err)) from None
    if images.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
        raise CommandError(f"the data are {list(images.shape[1:])} images, the model takes "
                           f"{[cfg.channels, cfg.image_size, cfg.image_size]}")
    use_labels = cfg.conditional and not args.unlabelled
    if use_labels and labels.max() >= cfg.num_classes:
        raise CommandError(f"the data have {labels.max() + 1} classes, the model {cfg.num_classes}; use --unlabelled")
    try:
        bpd = evaluate_bpd(model, images, labels if use_labels else None, batch_size=args.batch_size,
                           seed=args.seed, progress=progress("bpd"))
    except ValueError as err:
        raise CommandError(str(err)) from None
    print(f"bits/dim {bpd:.4f} ({where}, {len(images)} images, {'labelled' if use_labels else 'unlabelled'})")
