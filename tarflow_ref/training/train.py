"""Training by the released recipe (book/checkpoints.md, "Training recipe"; Zhai et al. 2024, Sec. 2.4 and 3).

Each step draws a batch of 8-bit images x_int: [B, c, S, S] and labels y: [B], and minimises the
per-dimension negative log-likelihood of the noise-augmented images

    x = x_int / 255 * 2 - 1 + sigma * eps,   eps ~ N(0, I)          (Gaussian noise augmentation)
    loss = 0.5 mean(z^2) - mean(logdet),     (z, logdet) = f(x, y~)   (TarFlow.loss)
    y~ = -1 with probability p_drop (0.1), else y                    (for classifier-free guidance)

with AdamW (betas 0.9, 0.95, weight decay 1e-4) and a learning rate that rises linearly over the
warm-up steps and then follows a cosine to zero:

    lr(s) = lr * (s + 1) / W                              for s < W
    lr(s) = lr * 0.5 * (1 + cos(pi (s - W) / (N - W)))     for W <= s < N

Randomness is stateless: the batch of step s is fixed by (seed, s) alone (data order: one
permutation per epoch; noise, label drops and flips: a generator seeded with (seed, s)), so a
run resumed at step s repeats an uninterrupted run exactly.

Outputs (TarFlowConfig.file_name): the model as a plain state dict of float32 tensors under
`{dataset}_model_{P}_{C}_{blocks}_{layers}_{sigma:.2f}.pth`, which load_checkpoint reads with
no extra flags, with a metadata record (the configuration with sigma, these settings, the step);
beside it `{same stem}.resume.pt`, to resume. Nothing is lost to an interruption: the pair is
written as one unit (train_state.py) every `save_every` steps or `save_minutes` minutes, at the
end, and when SIGINT or SIGTERM asks the run to stop (it stops after the current step). A run
holds the lock of its out-dir. A non-finite loss stops training with an error that names the
step and the learning rate, before that step changes any weight; weights that hold NaN or
infinity are never saved.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..config import TarFlowConfig
from ..io.checkpoint import check_state_dict, float32_state, model_metadata
from ..io.files import signals_held
from ..logdet import bits_per_dim, dequantize
from ..torch_backend import distributed
from ..torch_backend.checks import check_finite_weights, nonfinite_keys
from ..torch_backend.model import TarFlow
from ..torch_backend.precision import autocast
from ..validation import check_seed, nonfinite_message
from .data import load_dataset, to_model_range
from .train_state import load_pair, locked_out_dir, remove_stale_partials, resume_path, save_pair

SAVE_MINUTES = 5.0             # default time between checkpoints


@dataclass(frozen=True)
class TrainSettings:
    data: str = "digits"           # 'digits' or an image folder with one sub-folder per class
    image_size: int = 8
    channels: int = 1
    patch_size: int = 1
    width: int = 64                # a multiple of 64: load_checkpoint assumes head width 64
    blocks: int = 4
    layers: int = 1
    noise_std: float = 0.1         # sigma of the noise augmentation, also in the file name
    conditional: bool = True
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    drop_label: float = 0.1
    flip: bool = False             # random horizontal flips (the recipe's, for natural images; not digits)
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False             # bfloat16 autocast, CUDA only

    def __post_init__(self):
        positive = ("image_size", "channels", "patch_size", "width", "blocks", "layers", "steps", "batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.width % 64:
            raise ValueError(f"width must be a multiple of 64 (head width 64, as load_checkpoint assumes), "
                             f"got {self.width}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warm-up must be in 0..steps-1 = {self.steps - 1}, got {self.warmup}")
        # written so that nan fails too (every comparison with nan is False)
        if not (0 <= self.noise_std < math.inf and 0 <= self.weight_decay < math.inf and 0 < self.lr < math.inf):
            raise ValueError("noise_std and weight_decay must be finite and >= 0, lr finite and > 0; "
                             f"got {self.noise_std}, {self.weight_decay}, {self.lr}")
        if not 0 <= self.drop_label < 1:
            raise ValueError(f"drop_label must be in [0, 1), got {self.drop_label}")
        check_seed(self.seed)
        check_device(self.device, self.bf16)
        self.model_config(0)                        # a ConfigError names shapes that make no TarFlow

    @property
    def dataset_name(self) -> str:
        return "digits" if self.data == "digits" else Path(self.data).name

    @property
    def file_name(self) -> str:
        """The released pattern {dataset}_model_{P}_{C}_{blocks}_{layers}_{sigma:.2f}.pth."""
        return self.model_config(0).file_name(self.dataset_name)

    def model_config(self, num_classes: int) -> TarFlowConfig:
        return TarFlowConfig(image_size=self.image_size, patch_size=self.patch_size, channels=self.channels,
                             width=self.width, blocks=self.blocks, layers=self.layers,
                             num_classes=num_classes if self.conditional else 0, head_dim=64,
                             noise_std=self.noise_std)


def check_device(device: str, bf16: bool):
    """A clear error for CUDA without a GPU and for bfloat16 autocast off CUDA."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no GPU is available; use --device cpu")
    if device.startswith("cuda:"):
        index, count = device.removeprefix("cuda:"), torch.cuda.device_count()
        if not (index.isdigit() and int(index) < count):
            raise ValueError(f"device '{device}' does not exist: this machine has GPUs cuda:0..cuda:{count - 1}")
    if bf16 and not device.startswith("cuda"):
        raise ValueError("bfloat16 autocast (--bf16) needs --device cuda")


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """The multiplier of the base learning rate at step `step` (0-based): warm-up, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def make_optimizer(model, s: TrainSettings):
    """AdamW (betas 0.9, 0.95) and the warm-up + cosine schedule as a LambdaLR."""
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, s.warmup, s.steps))
    return opt, sched


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one step, fixed by (seed, step) alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices [B] of the step's batch: positions step*B .. step*B+B-1 of a stream of epochs,
    each epoch a fresh permutation of the n images fixed by (seed, epoch)."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // n, positions % n
    perms = {int(e): torch.randperm(n, generator=step_generator(seed, -1 - int(e))) for e in epochs.unique()}
    return torch.stack([perms[int(e)][o] for e, o in zip(epochs, offsets)])


def training_batch(images, labels, s: TrainSettings, step: int):
    """(x: [B, c, S, S] noise-augmented in model range, y: [B] with dropped labels -1, or None)."""
    idx = batch_indices(len(images), s.batch_size, s.seed, step)
    gen = step_generator(s.seed, step)
    x = to_model_range(images[idx.numpy()])
    if s.flip:
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    x = x + s.noise_std * torch.randn(x.shape, generator=gen)
    if not s.conditional:
        return x, None
    y = torch.as_tensor(labels[idx.numpy()])
    drop = torch.rand(len(y), generator=gen) < s.drop_label
    return x, torch.where(drop, -1, y)


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN or infinite."""


class TrainingLoss(torch.nn.Module):
    """The model's training loss as a module's forward, which DistributedDataParallel needs: its
    gradient averaging hooks into forward() (torch_backend/distributed.py, data_parallel)."""

    def __init__(self, model: TarFlow):
        super().__init__()
        self.model = model

    def forward(self, x, y=None):
        return self.model.loss(x, y)


def train_step(loss_of, opt, sched, x, y, s: TrainSettings, step: int) -> float:
    """One optimiser step on a batch; returns the loss (under torchrun: x, y are this rank's share
    of the step's batch, the loss returned is the mean over the ranks, the gradients are averaged
    over the ranks). A non-finite loss raises TrainingDiverged before the step changes any weight."""
    with autocast(torch.device(s.device), s.bf16):
        loss = loss_of(x.to(s.device), None if y is None else y.to(s.device))
    value = distributed.mean_over_ranks(loss.item())
    if not math.isfinite(value):
        raise TrainingDiverged(f"the loss is {value} at step {step} (learning rate "
                               f"{opt.param_groups[0]['lr']:.3g}): training diverged; lower --lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return value


@dataclass
class TrainResult:
    checkpoint: Path
    step: int                      # steps done so far
    losses: list                   # loss of every step from 0 to step - 1
    interrupted: str | None = None  # the signal that stopped the run early ('SIGINT', 'SIGTERM'), else None


def train(s: TrainSettings, out_dir=".", *, resume=False, force=False, stop_after: int | None = None,
          progress=None, save_every: int | None = None, save_minutes: float | None = SAVE_MINUTES) -> TrainResult:
    """Train (or resume) and write the checkpoint and its resume file into out_dir.

    Refuses to overwrite an existing run unless resume (continue it) or force (start over; the
    old pair stays until the first new one is complete). Before any work: out_dir is created,
    locked against other runs and so shown writable. Checkpoints are written every `save_every`
    steps and every `save_minutes` minutes (None: never), when SIGINT or SIGTERM arrives (the run
    then stops after the current step; `interrupted` names the signal) and at the end.
    stop_after: stop (and save) after this many steps in total, to continue later with resume.
    progress: wraps the step range (e.g. tqdm); if what it returns has `.set_postfix`, the loss
    of each step is shown there.
    """
    out_dir = Path(out_dir)
    path = out_dir / s.file_name
    if s.batch_size % distributed.world_size():
        raise ValueError(f"the batch size {s.batch_size} must be a multiple of the number of processes "
                         f"{distributed.world_size()}: each takes an equal share of every batch")
    with contextlib.ExitStack() as held, signals_held(reraise=False) as stops:
        # rank 0 alone holds the out-dir and reads the resume file; the others get its contents
        state = distributed.on_main(lambda: claim_out_dir(held, out_dir, path, resume, force))
        images, labels, num_classes = load_dataset(s.data, s.image_size, s.channels)
        cfg = s.model_config(num_classes)
        torch.manual_seed(s.seed)
        model = TarFlow(cfg).to(s.device)
        opt, sched = make_optimizer(model, s)
        losses = restore(state, s, model, opt, sched) if resume else []
        loss_of = distributed.data_parallel(TrainingLoss(model))
        saved, saved_time = len(losses), time.monotonic()

        def save():
            nonlocal saved, saved_time
            if distributed.is_main():
                write_checkpoint(path, model, opt, sched, s, losses)
            saved, saved_time = len(losses), time.monotonic()

        end = s.steps if stop_after is None else min(s.steps, stop_after)
        if distributed.any_rank(bool(stops)):            # asked to stop during the set-up: no step
            end = len(losses)
        model.train()
        steps = range(len(losses), end)
        bar = progress(steps) if progress else steps
        for step in bar:
            x, y = training_batch(images, labels, s, step)
            try:
                losses.append(train_step(loss_of, opt, sched, distributed.share(x),
                                         None if y is None else distributed.share(y), s, step))
            except TrainingDiverged as err:
                kept = f"the checkpoint of step {saved} is kept" if saved else "no checkpoint was written"
                raise TrainingDiverged(f"{err}; {kept}") from None
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            stopping = distributed.any_rank(bool(stops))   # every rank stops after the same step
            if stopping or (save_every and len(losses) - saved >= save_every) or \
                    (save_minutes is not None and time.monotonic() - saved_time >= 60 * save_minutes):
                save()
            if stopping:
                break
        if saved != len(losses):
            save()
        distributed.barrier()                           # the checkpoint is written when any rank returns
        return TrainResult(path, len(losses), losses, signal.Signals(stops[0]).name if stops else None)


def claim_out_dir(held: contextlib.ExitStack, out_dir: Path, path: Path, resume: bool, force: bool):
    """Lock out_dir for the run (held until `held` closes), clear a killed save's leftovers, refuse
    to replace a run without resume or force; returns the resume file's contents when resuming."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot use {out_dir} as the folder for the checkpoint: {err.strerror}") from None
    held.enter_context(locked_out_dir(out_dir))
    remove_stale_partials(path)
    found = [p for p in (path, resume_path(path)) if p.exists()]
    if found and not (resume or force):
        raise FileExistsError(f"{found[0]} exists; resume it (--resume) or start over (--force)")
    if resume and not resume_path(path).exists():
        raise FileNotFoundError(f"cannot resume: {resume_path(path)} does not exist")
    return load_pair(path) if resume else None


def write_checkpoint(path: Path, model, opt, sched, s: TrainSettings, losses: list):
    """The checkpoint pair of the run after len(losses) steps; weights that hold NaN or infinity
    raise TrainingDiverged instead."""
    weights = float32_state(model)
    bad = nonfinite_keys(weights)
    if bad:
        raise TrainingDiverged(f"after step {len(losses) - 1}: {nonfinite_message(bad)}; lower --lr")
    metadata = model_metadata(model.config, training=asdict(s), step=len(losses))
    save_pair(path, weights, metadata, {"settings": asdict(s), "step": len(losses), "losses": list(losses),
                                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})


def restore(state: dict, s: TrainSettings, model, opt, sched) -> list:
    """Restore model, optimiser and schedule from the resume file's contents (train_state.load_pair);
    the settings must match the interrupted run's. Returns the losses of the steps done."""
    saved = state["settings"]
    # device and bf16 may change between sessions; everything else shapes the run
    differ = [f.name for f in fields(s) if f.name not in ("device", "bf16") and saved.get(f.name) != getattr(s, f.name)]
    if differ:
        raise ValueError("cannot resume with different settings: " +
                         ", ".join(f"{k} was {saved.get(k)!r}, now {getattr(s, k)!r}" for k in differ))
    check_state_dict(state["model"], model.state_dict())
    model.load_state_dict(state["model"], strict=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return list(state["losses"])


@torch.no_grad()
def evaluate_bpd(model, images, labels=None, *, batch_size: int = 256, seed: int = 0, progress=None) -> float:
    """Mean bits per dimension of 8-bit images [N, c, S, S] (book/checkpoints.md, "Bits per
    dimension": uniform dequantisation).

    A conditional model is scored as -log p(x | y) with the true labels; labels None uses the
    model's unlabelled branch (the mean class embedding). A model with NaN or infinite weights,
    and a result that is not finite, raise a ValueError: never a "nan" figure.
    """
    check_finite_weights(model, "evaluated")
    check_seed(seed)
    model.eval()
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    starts = range(0, len(images), batch_size)
    total = 0.0
    for start in (progress(starts) if progress else starts):
        x = torch.as_tensor(dequantize(images[start:start + batch_size], rng), dtype=torch.float32, device=device)
        y = None if labels is None else torch.as_tensor(labels[start:start + batch_size], device=device)
        z, logdet = model(x, y)
        total += bits_per_dim(z.double(), logdet.double()).sum().item()
    if not math.isfinite(total):
        raise ValueError(f"bits/dim came out {total / len(images)}: the model overflows on these images")
    return total / len(images)
