"""What one sampling step of the engine spends its time on: kernels, their GPU time, and the gaps.

    python benchmarks/step_profile.py --config quick                         # CPU, seconds
    python benchmarks/step_profile.py --config imagenet_model_4_1024_8_8_0.05.pth --batch 32   # GPU

A replayed CUDA graph hides its kernels from the host, so this script measures two things side
by side, at the same positions t0..t0+K-1 of the last sampled block (t0 = T/2 by default):

  eager   K steps of the graph body (Engine.graph_body: the step at the device position) under
          torch.profiler: every kernel, its count per step and its GPU time per step. Their sum
          is what the step costs if the GPU never waits between kernels.
  replay  K replays of the captured graphs (CUDA), wall clock per step.

replay - kernel time = the time the GPU spends between kernels (launch latency inside the graph,
tails of small kernels). On the CPU (no graphs) the profiler's rows are CPU ops and "replay" is
the eager step itself.
"""
import argparse
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from tarflow_ref import Guidance
from tarflow_ref.torch_backend.engine import Engine, engine_precision

from sampling import build, synchronize  # benchmarks/sampling.py, beside this script


def kernel_rows(prof, device):
    """{name: (calls, microseconds)} of the device kernels (CUDA) or the CPU ops (CPU) recorded."""
    rows = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        on_gpu = event.device_type == torch.autograd.DeviceType.CUDA
        if device.type == "cuda" and not on_gpu:
            continue
        if device.type == "cpu" and (on_gpu or not event.name.startswith("aten::") or event.cpu_parent is not None):
            continue                     # top-level aten ops only: their children are inside them
        rows[event.name][0] += 1
        rows[event.name][1] += event.device_time if on_gpu else event.cpu_time
    return rows


def profile_steps(engine, b, start, steps):
    """Profile `steps` eager graph-body steps of block b from position `start`; returns the profiler."""
    block = engine.blocks[b]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with torch.no_grad(), engine_precision(engine.device, engine.bf16):
        engine.position.fill_(start)
        engine.graph_body(block, engine.position, engine.span_for(start))           # warm, unprofiled
        synchronize(engine.device)
        engine.position.fill_(start)
        with profile(activities=activities) as prof:
            for t in range(start, start + steps):
                engine.graph_body(block, engine.position, engine.span_for(t))
            synchronize(engine.device)
    return prof


def replay_seconds(engine, b, start, steps):
    """Wall seconds per step of `steps` steps from `start`, as the engine samples: graph replays on
    CUDA, eager steps on the CPU."""
    with torch.no_grad(), engine_precision(engine.device, engine.bf16):
        engine.position.fill_(start)
        synchronize(engine.device)
        started = time.perf_counter()
        for t in range(start, start + steps):
            engine.decode(b, t)
        synchronize(engine.device)
    return (time.perf_counter() - started) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quick", help="a released file name, 'quick' or 'bundled'")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["bf16", "float32"], default=None, help="default bf16 on CUDA")
    parser.add_argument("--guidance", type=float, default=None, help="guidance weight, 0 = off (default: published)")
    parser.add_argument("--steps", type=int, default=8, help="steps profiled and timed")
    parser.add_argument("--start", type=int, default=None, help="first position (default T/2)")
    parser.add_argument("--compile", action="store_true", help="Engine(compile=True)")
    parser.add_argument("--top", type=int, default=15, help="rows of the kernel table")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = (args.dtype or ("bf16" if device.type == "cuda" else "float32")) == "bf16"
    torch.set_num_threads(1)
    model, guidance, _ = build(args.config, device, torch.float32, out_scale=0.1)
    if args.guidance is not None:
        guidance = Guidance(args.guidance, guidance.what, guidance.annealed, guidance.temperature)
    cfg = model.config
    T, b = cfg.tokens, cfg.blocks - 1
    start = T // 2 if args.start is None else args.start
    if not 0 <= start <= T - 1 - args.steps:
        parser.error(f"--start {start} with --steps {args.steps} must fit in positions 0..{T - 2}")
    engine = Engine(model.blocks, args.batch, guidance, bf16, compile=args.compile)
    if engine.graphs:
        engine.capture()
    gen = torch.Generator().manual_seed(0)
    engine.load(b, torch.randn(args.batch, T, cfg.token_dim, generator=gen).to(device))
    if cfg.conditional:
        engine.set_labels((torch.arange(args.batch) % cfg.num_classes).to(device))

    rows = kernel_rows(profile_steps(engine, b, start, args.steps), device)
    per_step = args.steps
    kernels = sum(calls for calls, _ in rows.values()) / per_step
    busy = sum(us for _, us in rows.values()) / per_step
    wall = replay_seconds(engine, b, start, args.steps) * 1e6
    what = "kernels" if device.type == "cuda" else "top-level aten ops"
    print(f"{args.config}, batch {args.batch}, {'bf16' if bf16 else 'float32'}, guidance {guidance}, "
          f"positions {start}..{start + args.steps - 1} of block {b}, device {device.type}"
          f"{', compiled' if args.compile else ''}")
    print(f"{what} per step: {kernels:.0f}; their time per step: {busy:.0f} us; "
          f"{'replayed' if engine.captured else 'eager'} step: {wall:.0f} us; between them: {wall - busy:.0f} us")
    print(f"| {what[:-1] if what.endswith('s') else what} | per step | us per step | share |")
    print("|---|---|---|---|")
    for name, (calls, us) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"| {name[:90]} | {calls / per_step:.0f} | {us / per_step:.1f} | {us / per_step / busy:.0%} |")


if __name__ == "__main__":
    sys.exit(main())
