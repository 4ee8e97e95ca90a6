"""Running one command on several processes with torch.distributed (one process per GPU, or
several CPU processes), as started by torchrun:

    torchrun --nproc-per-node=N -m tarflow_ref sample --num-images 50000 ...

torchrun starts N copies of the command and tells each its place in the environment: RANK
(0..W-1 over every node), WORLD_SIZE (W), LOCAL_RANK (0..N-1 on this node) and the address of
rank 0. `session` joins them into one process group (NCCL between GPUs, gloo between CPU
processes) and makes cuda:LOCAL_RANK the current GPU of each, so that 'cuda' everywhere else
means the rank's own GPU. Without torchrun there is one process: rank 0 of a world of 1, no
process group, and every function below returns its input.

How the commands split their work (book/evaluation.md, "Many processes"):

    sample, fid   batch k of the run goes to rank k mod W (round robin); its noise is the k-th
                  draw of the one seeded stream, so the images do not depend on W
    fid           float64 feature sums added on each rank, summed over the ranks: sum_over_ranks
    sample        the batches gathered to rank 0 in order: gather_to_main
    train         the global batch of step s split in W equal slices (share), gradients
                  averaged by DistributedDataParallel (data_parallel)

Rank 0 alone writes files and prints results (`session` sends the others' standard output
nowhere; their errors still reach standard error). A process that fails ends the job: torchrun
stops the others, and no collective waits longer than TIMEOUT.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=30)         # the longest any rank waits for the others in one collective


def launched() -> bool:
    """Started by torchrun (which sets RANK and WORLD_SIZE for every process it starts)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def check_device(device: str):
    """Under torchrun, each rank takes the GPU cuda:LOCAL_RANK itself: an explicit cuda:i would
    put every rank on one GPU."""
    if launched() and device.startswith("cuda:"):
        raise ValueError(f"under torchrun use --device cuda, not {device}: each process takes the GPU of its "
                         f"local rank")


@contextlib.contextmanager
def session(device: str = "cpu"):
    """While the block runs, this process is one rank of torchrun's job (a no-op without torchrun)."""
    if not launched():
        yield
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        with open(os.devnull, "w") as nowhere, \
                contextlib.redirect_stdout(nowhere) if not is_main() else contextlib.nullcontext():
            yield
    finally:
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where this rank's collectives run: NCCL moves CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the ranks (the same shape and dtype, on every rank; float64 stays float64)."""
    if not active():
        return x
    total = x.to(_device(), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(x.device)


def mean_over_ranks(value: float) -> float:
    """The mean of one number over the ranks (in float64)."""
    return sum_over_ranks(torch.tensor(value, dtype=torch.float64)).item() / world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    return sum_over_ranks(torch.tensor(float(flag), dtype=torch.float64)).item() > 0


def gather_to_main(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others (pickled: CPU tensors, numbers)."""
    if not active():
        return [obj]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def on_main(fn):
    """fn() run on rank 0 only; every rank returns its result, or raises the exception it raised
    (so that an error found by rank 0, such as a bad resume file, ends every rank the same way)."""
    if not active():
        return fn()
    box = [None]
    if is_main():
        try:
            box[0] = ("value", fn())
        except Exception as err:  # noqa: BLE001 (passed on to every rank, raised again there)
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    kind, payload = box[0]
    if kind == "error":
        raise payload
    return payload


def barrier():
    if active():
        dist.barrier()


def share(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch [B, ...]: rows r B/W .. (r+1) B/W - 1 (B a multiple of W)."""
    size = len(x) // world_size()
    return x[rank() * size:(rank() + 1) * size]


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel(module) over the ranks (gradients averaged in backward), or the
    module itself in a single process. DDP hooks run through forward(), so `module` computes the
    loss in its forward."""
    if not active():
        return module
    return torch.nn.parallel.DistributedDataParallel(module)
