"""A small feature network for FID on the 8x8 digits (book/checkpoints.md, "FID statistics files").

Inception's features mean nothing on 8x8 grey digits (and its weights exist only inside the
released statistics files), so, as is usual for MNIST-like data, FID on the digits uses the
penultimate layer of a classifier trained on the digits' training split:

    uint8 [B, 1, 8, 8] -> x / 255 * 2 - 1 -> conv 3x3 (32) -> ReLU -> conv 3x3 (64) -> ReLU -> max pool 2
        -> conv 3x3 (64) -> ReLU -> max pool 2 -> [B, 256] -> linear (64) -> ReLU = features [B, 64]
        -> fc: 10 logits (training only)

`train_digit_features` trains it by cross-entropy (AdamW, fixed seed). The bundled statistics
file `tarflow_ref/assets/digits_8_fid_stats.pth` holds it under the prefix `digit_features.` with
the statistics of the 360 held-out digits, in the released layout; tarflow_ref/assets/README.md
gives the command that makes it:

    python -m tarflow_ref.evaluation.digit_features --out tarflow_ref/assets/digits_8_fid_stats.pth
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..training.data import DIGITS_CLASSES, load_digits_split, to_model_range

FEATURES = 64


class DigitFeatures(nn.Module):
    """uint8 digits [B, 1, 8, 8] -> features [B, 64] float32 (module docstring)."""
    prefix = "digit_features"   # the key prefix of this network in a statistics file
    channels = 1
    features = FEATURES

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * 2 * 2, FEATURES)
        self.fc = nn.Linear(FEATURES, DIGITS_CLASSES)

    def embed(self, x):
        """Model-range images [B, 1, 8, 8] -> features [B, 64] (differentiable, for training)."""
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)      # [B, 64, 4, 4]
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)                           # [B, 64, 2, 2]
        return F.relu(self.hidden(x.flatten(1)))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(f"the digit feature network takes uint8 digits [B, 1, 8, 8]; got "
                             f"{images.dtype} {list(images.shape)}")
        return self.embed(to_model_range(images.cpu()).to(self.fc.weight.device))

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 digits -> predicted labels [B] (how well the features separate the digits)."""
        return self.fc(self(images)).argmax(dim=1)


def train_digit_features(seed: int = 0, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3,
                         progress=None) -> DigitFeatures:
    """Cross-entropy on the 1437 training digits; AdamW (weight decay 1e-4), the learning rate
    falling linearly to 0, batches shuffled by a generator seeded with `seed`. Returns the network
    in eval mode."""
    torch.manual_seed(seed)                                            # the initial weights
    net = DigitFeatures()
    images, labels = load_digits_split("train")
    x, y = to_model_range(images), torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(x) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    net.train()
    epochs_range = range(epochs)
    for _ in (progress(epochs_range) if progress else epochs_range):
        for batch in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = F.cross_entropy(net.fc(net.embed(x[batch])), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return net.eval()


def main(argv=None):
    """Train the network and write the statistics file of the held-out digits (the bundled asset)."""
    from .fid import ArrayImages, accumulate, write_stats_file

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="statistics file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists; pass --force to replace it")
    torch.set_num_threads(1)                      # one thread: the bits do not depend on the machine's cores
    net = train_digit_features(args.seed)
    images, labels = load_digits_split("test")
    accuracy = (net.classify(torch.as_tensor(images)) == torch.as_tensor(labels)).float().mean()
    stats = accumulate(ArrayImages(images), net).stats
    write_stats_file(args.out, stats, net)
    print(f"wrote {args.out}: {stats.n} held-out digits, {stats.dim} features; "
          f"the network labels {100 * float(accuracy):.1f} % of them correctly")


if __name__ == "__main__":
    main()
