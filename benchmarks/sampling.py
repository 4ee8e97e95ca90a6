"""Where sampling time goes: the textbook loop, the sampling engine, GS-Jacobi on the engine, one
parallel forward pass (the arithmetic floor) and the memory-traffic floor, side by side for each
configuration.

    python benchmarks/sampling.py --quick                     # a small model on the CPU, seconds
    python benchmarks/sampling.py --bundled                   # the bundled digits model (trained)
    python benchmarks/sampling.py --batch 32 --json out.json  # the released configurations (GPU)

Columns: (a) textbook.inverse (per token, growing caches, two branch passes), (b) the engine
(static caches, one batch of 2B, CUDA graphs on CUDA), (c) tarflow_ref.sample_gsj
with the published strategy (or one found by auto_strategy for the small models), (d) one forward
pass model(x, y) over the same batch, (e) the memory floor of any exact sequential sampler:
tarflow_ref.traffic.sequential_traffic (weights once per step, plus the KV cache read and
written; bytes per value from --dtype, guided iff guidance is on) divided by the copy bandwidth
measured in the same run (`measure_bandwidth`, printed in the header). Released configurations
get random weights (torch_backend.model.randomize_) in the released layout and the published
guidance.

Timings are the best of --repeat runs, (a) and (b) interleaved (a, b, a, b, ...) so that a change
in the machine's load between them does not read as a speed-up; on CUDA the clocks are read after
a synchronise; every timed function runs once untimed first (first-call costs; on CUDA
cuDNN's attention plans, see `measure_side_by_side`), and the engine's
warm-up and graph capture happen before its timed run and are reported separately.
--max-textbook-steps K (or --max-steps K) times (a) on two windows of K steps of the first
sampled block, the first K (t = 0..K-1) and the last K (t = T-1-K..T-2, started by
textbook.block_inverse(first=T-1-K) after one parallel pass fills the caches; that pass is timed
alone and subtracted), fits the per-step cost c(t) = c0 + c1 t through the two window means (the
textbook's cost grows with t: it copies its whole cache every step) and sums c(t) over t = 0..T-2
and the N blocks (`two_window_total`), marked '~'. --max-steps K also times only the first K
tokens of one block for (b) and scales by N (T - 1) / K, marked '~': a lower bound, since later
tokens attend to more keys. max|a-b| then compares the first window.
"""
import argparse
import json
import math
import platform
import sys
import time

import torch

from tarflow_ref import Guidance, TarFlow, TarFlowConfig, load_checkpoint
from tarflow_ref.registry import RELEASED_FILES
from tarflow_ref.strategy import PRESETS
from tarflow_ref.torch_backend import textbook
from tarflow_ref.torch_backend.engine import Engine
from tarflow_ref.torch_backend.jacobi import sample_gsj
from tarflow_ref.torch_backend.model import randomize_
from tarflow_ref.torch_backend.precision import autocast
from tarflow_ref.torch_backend.strategy_search import auto_strategy
from tarflow_ref.traffic import floor_seconds, sequential_traffic

QUICK = TarFlowConfig(image_size=16, patch_size=2, channels=3, width=64, blocks=2, layers=2, num_classes=10,
                      head_dim=16)
DEFAULT_GUIDANCE = Guidance(1.0)          # for a configuration without a published setting
BYTES_PER_VALUE = {"bf16": 2, "float32": 4, "float64": 8}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure_side_by_side(fns, repeats, device, clock, warm_up=False):
    """[(result, best seconds, peak GPU MiB or None)] of each fn() over its number of runs in
    `repeats`, the runs interleaved (a, b, a, b, ...) so that a change in the machine's load hits
    every fn alike. Each fn runs once untimed first if warm_up is set, and always on CUDA: there
    cuDNN's attention builds a plan for each new shape the first time it meets one (the textbook
    loop meets a new key length at every token, about 70 ms each on an H200), a one-off cost that
    later batches do not pay."""
    cuda = device.type == "cuda"
    if warm_up or cuda:
        for fn in fns:
            fn()
    best, peak, results = [math.inf] * len(fns), [0.0] * len(fns), [None] * len(fns)
    for run in range(max(repeats)):
        for i, fn in enumerate(fns):
            if run >= repeats[i]:
                continue
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            started = clock()
            results[i] = fn()
            synchronize(device)
            best[i] = min(best[i], clock() - started)
            if cuda:
                peak[i] = max(peak[i], torch.cuda.max_memory_allocated() / 2 ** 20)
    return [(results[i], best[i], peak[i] if cuda else None) for i in range(len(fns))]


def measure(fn, device, repeat, clock, warm_up=False):
    """(result, best seconds, peak GPU MiB or None) of fn() over `repeat` runs (measure_side_by_side)."""
    return measure_side_by_side([fn], [repeat], device, clock, warm_up)[0]


def measure_bandwidth(device, repeat=5):
    """Bytes per second of copying one large tensor (2 GiB on CUDA, 256 MiB on the CPU): read plus
    write, so twice its size, over the best of `repeat` copies after a warm-up copy."""
    size = 2 ** 31 if device.type == "cuda" else 2 ** 28
    source = torch.ones(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    _, seconds, _ = measure(lambda: target.copy_(source), device, repeat, time.perf_counter, warm_up=True)
    return 2 * size / seconds


def two_window_total(early_s, late_s, steps, tokens, blocks):
    """Seconds of N blocks of T - 1 steps, N sum_{t=0}^{T-2} c(t), for the per-step cost
    c(t) = c0 + c1 t through the means of two timed windows of K = `steps` steps: t = 0..K-1
    (early_s seconds in all, mean cost early_s / K at t = (K - 1) / 2) and t = T-1-K..T-2
    (late_s, at t = T - 2 - (K - 1) / 2). A linear c sums to (T - 1) c((T - 2) / 2), and
    (T - 2) / 2 lies midway between the two windows, where the line is the mean of their costs."""
    if not 1 <= steps < tokens - 1:
        raise ValueError(f"two windows of {steps} steps need 1 <= steps < T - 1 = {tokens - 1}")
    return blocks * (tokens - 1) * (early_s + late_s) / (2 * steps)


def published(name):
    """(strategy, guidance) of the published GS-Jacobi setting for a released file, or Nones."""
    preset = PRESETS.get(name)
    return (preset.strategy, preset.guidance) if preset else (None, None)


def random_model(cfg, device, dtype, out_scale):
    # built on the device: the default initialisation of 0.8 G parameters is slow on a CPU
    with torch.device(device):
        model = TarFlow(cfg)
    return randomize_(model, seed=0, out_scale=out_scale).to(dtype).eval()


def build(name, device, dtype, out_scale):
    """(model, guidance, GS-Jacobi strategy or 'auto' or None) for a configuration name."""
    if name == "quick":
        return random_model(QUICK, device, dtype, out_scale), Guidance(1.5, temperature=0.8), "auto"
    if name == "bundled":
        from tarflow_ref.assets import BUNDLED_GUIDANCE, bundled_checkpoint
        return load_checkpoint(bundled_checkpoint()).to(device, dtype).eval(), Guidance(BUNDLED_GUIDANCE), "auto"
    strategy, guidance = published(name)
    model = random_model(TarFlowConfig.from_release_name(name), device, dtype, out_scale)
    return model, guidance or DEFAULT_GUIDANCE, strategy


def gs_jacobi(model, noise, y, guidance, strategy, bf16, timed):
    """(seconds, strategy text) of sample_gsj, or (None, reason)."""
    if strategy is None:
        return None, "no published strategy"
    if strategy == "auto":
        strategy = auto_strategy(model, None if y is None else y[:4], guidance, batch=min(4, len(noise)))
    _, seconds, _ = timed(lambda: sample_gsj(model, noise, y, strategy, guidance, bf16=bf16))
    return seconds, str(strategy)


def run_config(name, built, batch, args, device, bandwidth):
    """One row of the table: configuration `name`, its (model, guidance, strategy) from `build`."""
    bf16 = args.dtype == "bf16"

    def timed(fn, repeat=args.repeat, warm_up=False):
        return measure(fn, device, repeat, CLOCKS[args.clock], warm_up)
    model, guidance, strategy = built
    dtype = model.var.dtype
    if args.guidance is not None:
        guidance = Guidance(args.guidance, guidance.what, guidance.annealed, guidance.temperature)
    cfg = model.config
    T, N = cfg.tokens, cfg.blocks
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(batch, T, cfg.token_dim, generator=gen).to(device, dtype)
    y = (torch.arange(batch) % cfg.num_classes).to(device) if cfg.conditional else None
    z = noise * model.var.sqrt()
    row = {"config": name, "tokens": T, "blocks": N, "width": cfg.width, "batch": batch, "dtype": args.dtype,
           "device": device.type, "compiled": args.compile,
           "guidance": f"{guidance.weight} {guidance.what} tau_u={guidance.temperature}"}

    def prefix(limit):
        """(steps, extrapolation factor): a prefix of one block, or every step when limit is None."""
        if limit is None or limit >= T - 1:
            return None, 1.0
        return limit, N * (T - 1) / limit
    engine_steps, engine_scale = prefix(args.max_steps)
    textbook_steps, _ = prefix(min(filter(None, [args.max_steps, args.max_textbook_steps]), default=None))

    engine = Engine(model.blocks, batch, guidance, bf16, compile=args.compile)
    engine.set_labels(y)
    capture = engine.capture() if engine.graphs else 0.0

    def textbook_run(steps, first=0):
        # a late window takes z's tokens 0..first as decoded ones: the cost does not depend on the values
        if steps is None:
            return textbook.inverse(model, z, y, guidance, bf16=bf16)
        with autocast(device, bf16):
            return textbook.block_inverse(model.blocks[-1], z, y, guidance, steps=steps, first=first)

    def engine_run(steps):
        return engine.inverse(z, y) if steps is None else engine.block_inverse(N - 1, z, steps=steps)
    # (a) and (b) side by side: on a shared machine a load change between them would read as a
    # speed-up; warmed up, or a one-run window carries the first call's costs into the extrapolation
    (slow_out, slow_s, slow_peak), (fast_out, fast_s, fast_peak) = measure_side_by_side(
        [lambda: textbook_run(textbook_steps), lambda: engine_run(engine_steps)], [args.textbook_repeat, args.repeat],
        device, CLOCKS[args.clock], warm_up=True)
    windows_s = None
    if textbook_steps:
        late = T - 1 - textbook_steps
        _, prefill_s, _ = timed(lambda: textbook_run(0, late), args.textbook_repeat, warm_up=True)
        _, late_s, late_peak = timed(lambda: textbook_run(textbook_steps, late), args.textbook_repeat, warm_up=True)
        windows_s = [slow_s, late_s - prefill_s]
        slow_peak = None if slow_peak is None else max(slow_peak, late_peak)
        slow_s = two_window_total(*windows_s, textbook_steps, T, N)
    if textbook_steps != engine_steps:                      # compare like with like: the textbook's prefix
        fast_out = engine_run(textbook_steps)

    images = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=gen).to(device, dtype)
    with torch.no_grad(), autocast(device, bf16):
        _, forward_s, _ = timed(lambda: model(images, y), warm_up=True)

    traffic = sequential_traffic(cfg, batch, guidance.active, BYTES_PER_VALUE[args.dtype])
    gsj_s, gsj_strategy = (None, "not timed with --max-steps") if engine_steps else \
        gs_jacobi(model, noise, y, guidance, strategy, bf16, timed)
    row.update(textbook_steps=textbook_steps, engine_steps=engine_steps, textbook_s=slow_s,
               textbook_windows_s=windows_s, engine_s=fast_s * engine_scale, capture_s=capture, gs_jacobi_s=gsj_s,
               gs_jacobi_strategy=gsj_strategy, forward_s=forward_s, traffic=traffic, bandwidth=bandwidth,
               memory_floor_s=floor_seconds(traffic, bandwidth),
               max_abs_diff=float((slow_out.double() - fast_out.double()).abs().max()),
               max_abs_value=float(slow_out.double().abs().max()),
               peak_mib_textbook=slow_peak, peak_mib_engine=fast_peak)
    return row


def fmt(seconds, approx=False):
    if seconds is None:
        return "n/a"
    return ("~" if approx else "") + (f"{seconds:.3g}" if seconds < 100 else f"{seconds:.0f}")


def table(rows):
    head = ["config", "T", "B", "dtype", "guidance", "(a) textbook s", "(b) engine s", "a/b", "(c) GS-Jacobi s",
            "b/c", "(d) forward s", "b/d", "(e) memory floor s", "b/e", "a/e", "max|a-b|", "capture s",
            "peak MiB a / b"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gsj = r["gs_jacobi_s"]
        peak = "n/a" if r["peak_mib_textbook"] is None else f"{r['peak_mib_textbook']:.0f} / {r['peak_mib_engine']:.0f}"
        cells = [r["config"], r["tokens"], r["batch"], r["dtype"], r["guidance"],
                 fmt(r["textbook_s"], r["textbook_steps"]),
                 fmt(r["engine_s"], r["engine_steps"]), f"{r['textbook_s'] / r['engine_s']:.1f}x",
                 fmt(gsj) if gsj else f"n/a ({r['gs_jacobi_strategy']})",
                 f"{r['engine_s'] / gsj:.1f}x" if gsj else "n/a", fmt(r["forward_s"]),
                 f"{r['engine_s'] / r['forward_s']:.0f}x", fmt(r["memory_floor_s"]),
                 f"{r['engine_s'] / r['memory_floor_s']:.0f}x", f"{r['textbook_s'] / r['memory_floor_s']:.0f}x",
                 f"{r['max_abs_diff']:.1e}", f"{r['capture_s']:.2f}", peak]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    notes = [f"- {r['config']}: ~ (a) extrapolated from two windows of {r['textbook_steps']} steps of one block, "
             "the first and the last, linear fit; max|a-b| over the first" for r in rows if r["textbook_steps"]]
    notes += [f"- {r['config']}: ~ (b) extrapolated from the first {r['engine_steps']} tokens of one block "
              "(a lower bound)" for r in rows if r["engine_steps"]]
    notes += [f"- {r['config']}: GS-Jacobi strategy {r['gs_jacobi_strategy']}" for r in rows if r["gs_jacobi_s"]]
    return "\n".join(lines + notes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None,
                        help="released file names, 'quick' or 'bundled' (default: the five released files)")
    parser.add_argument("--quick", action="store_true", help="the small 'quick' configuration on the CPU, batch 4")
    parser.add_argument("--bundled", action="store_true", help="the bundled digits model on the CPU, batch 16")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 32)")
    parser.add_argument("--dtype", choices=["bf16", "float32", "float64"], default=None,
                        help="bf16 = float32 model under bfloat16 autocast (default bf16 on CUDA, float32 on the CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="time (a) on two windows of this many steps and (b) on the first ones, "
                             "and extrapolate (see above)")
    parser.add_argument("--max-textbook-steps", type=int, default=None,
                        help="the two windows for (a) alone (a full-size textbook run takes minutes on a GPU)")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs for (b), (c), (d)")
    parser.add_argument("--textbook-repeat", type=int, default=1, help="best of this many runs for (a)")
    parser.add_argument("--out-scale", type=float, default=0.1,
                        help="proj_out scale of the random weights (small keeps random samples finite)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance weight for every configuration, 0 = off (default: the published one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (more threads on a busy machine only add waiting)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the process's CPU time (steadier on a shared machine; CPU runs with 1 thread only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="(b) with Engine(compile=True): torch.compile of the step")
    parser.add_argument("--json", default=None,
                        help="also write the rows as JSON to this path (rewritten after every row)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = args.configs or (["quick"] if args.quick else ["bundled"] if args.bundled else list(RELEASED_FILES))
    if (args.quick or args.bundled) and args.device is None:
        device = torch.device("cpu")
    if args.clock == "cpu" and (args.threads != 1 or device.type != "cpu"):
        parser.error("--clock cpu measures one CPU thread: use it with --threads 1 on the CPU")
    batches = args.batch or ([4] if args.quick else [16] if args.bundled else [32])
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "float32")
    unknown = [n for n in names if n not in RELEASED_FILES and n not in ("quick", "bundled")]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: quick, bundled, {', '.join(RELEASED_FILES)}")

    bandwidth = measure_bandwidth(device)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    meta = {"device": device.type, "device_name": gpu, "torch": torch.__version__, "threads": args.threads,
            "clock": args.clock, "bandwidth": bandwidth, "command": " ".join(sys.argv)}
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    rows = []
    for name in names:
        built = build(name, device, dtype, args.out_scale)          # once per configuration, for every batch
        for batch in batches:
            rows.append(run_config(name, built, batch, args, device, bandwidth))
            # the row as soon as it is measured, so that a run cut short by a time limit still tells
            print(table(rows[-1:]).splitlines()[2], file=sys.stderr, flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=2)
        del built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"device: {device.type} ({gpu}), torch {torch.__version__}, {args.threads} CPU threads, "
          f"{args.clock} clock, copy bandwidth {bandwidth / 1e9:.0f} GB/s{', compiled engine' if args.compile else ''}")
    print(table(rows))


if __name__ == "__main__":
    main()
