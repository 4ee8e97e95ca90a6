"""One process against W processes under torchrun, side by side: the wall time of the same
command (sample, fid, train) started as `python -m tarflow_ref ...` and as
`python -m torch.distributed.run --standalone --nproc-per-node=W -m tarflow_ref ...`, start-up
of the interpreters and of the process group included, and the ratio.

    python benchmarks/distributed.py                      # the bundled digits model, 2 CPU processes
    python benchmarks/distributed.py --ranks 8 --device cuda --num-images 4096 --batch-size 256

Runs are interleaved (1, W, 1, W, ...) and the best of --repeat is kept, so that a change in the
machine's load between them does not read as a speed-up. Each process gets --threads threads.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall_seconds(command: list, ranks: int, threads: int) -> float:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *launcher, "-m", "tarflow_ref", *command], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="threads per process (default: 1)")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="training steps (default: 40)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    common = ["--device", args.device, "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "sample": ["sample", "--num-images", str(args.num_images), "--batch-size", str(args.batch_size),
                       "--out", f"{tmp}/s.png", "--force", *common],
            "fid": ["fid", "--num-images", str(args.num_images), "--batch-size", str(args.batch_size), *common],
            "train": ["train", "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--warmup", "1",
                      "--out-dir", f"{tmp}/run", "--force", "--save-minutes", "0", *common],
        }
        print(f"{'command':8} {'1 process s':>12} {f'{args.ranks} processes s':>14} {'ratio':>7}")
        for name, command in commands.items():
            best = {1: float("inf"), args.ranks: float("inf")}
            for _ in range(args.repeat):
                for ranks in best:
                    best[ranks] = min(best[ranks], wall_seconds(command, ranks, args.threads))
            print(f"{name:8} {best[1]:12.1f} {best[args.ranks]:14.1f} {best[1] / best[args.ranks]:6.2f}x")


if __name__ == "__main__":
    main()
