"""Where sampling time goes: the textbook loop, the sampling engine, GS-Jacobi on the engine, and
one parallel forward pass (the arithmetic floor), side by side for each configuration.

    python benchmarks/sampling.py --quick                     # a small model on the CPU, seconds
    python benchmarks/sampling.py --bundled                   # the bundled digits model (trained)
    python benchmarks/sampling.py --batch 32 --json out.json  # the released configurations (GPU)

Columns: (a) textbook.inverse (per token, growing caches, two branch passes), (b) the engine
(static caches, one batch of 2B, CUDA graphs on CUDA), (c) tarflow_ref.torch_backend.jacobi.sample_gsj
with the published strategy (or one found by auto_strategy for the small models), (d) one forward
pass model(x, y) over the same batch. Released configurations get random weights
(torch_backend.model.randomize_) in the released layout and the published guidance.

Timings are the best of --repeat runs; on CUDA the clocks are read after a synchronise, every
timed function runs once untimed first (cuDNN's attention plans, see `measure`), and the engine's
warm-up and graph capture happen before its timed run and are reported separately.
--max-steps K times only the first K tokens of the first sampled block for (a) and (b) and
extrapolates to N (T - 1) tokens, marked '~': later tokens attend to more keys (and the
textbook copies a longer cache), so it is a lower bound, more so for (a). --max-textbook-steps K
does so for (a) alone; max|a-b| then compares that prefix.
"""
import argparse
import json
import math
import platform
import sys
import time

import torch

from tarflow_ref import Guidance, TarFlow, TarFlowConfig, load_checkpoint
from tarflow_ref.config import RELEASED_FILES
from tarflow_ref.strategy import PRESETS
from tarflow_ref.torch_backend import textbook
from tarflow_ref.torch_backend.engine import Engine, autocast
from tarflow_ref.torch_backend.jacobi import auto_strategy, sample_gsj
from tarflow_ref.torch_backend.model import randomize_

QUICK = TarFlowConfig(image_size=16, patch_size=2, channels=3, width=64, blocks=2, layers=2, num_classes=10,
                      head_dim=16)
DEFAULT_GUIDANCE = Guidance(1.0)          # for a configuration without a published setting


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(fn, device, repeat, clock, warm_up=False):
    """(result, best seconds, peak GPU MiB or None) of fn() over `repeat` runs, after one untimed
    run if warm_up is set, and always on CUDA: there cuDNN's attention builds a plan for each new
    shape the first time it meets one (the textbook loop meets a new key length at every token,
    about 70 ms each on an H200), a one-off cost that later batches do not pay."""
    if warm_up or device.type == "cuda":
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best, result = math.inf, None
    for _ in range(repeat):
        synchronize(device)
        started = clock()
        result = fn()
        synchronize(device)
        best = min(best, clock() - started)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
    return result, best, peak


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
    _, seconds, _ = timed(lambda: sample_gsj(model, noise, y, strategy, guidance, bf16))
    return seconds, str(strategy)


def run_config(name, batch, args, device):
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    bf16 = args.dtype == "bf16"

    def timed(fn, repeat=args.repeat, warm_up=False):
        return measure(fn, device, repeat, CLOCKS[args.clock], warm_up)
    model, guidance, strategy = build(name, device, dtype, args.out_scale)
    if args.guidance is not None:
        guidance = Guidance(args.guidance, guidance.what, guidance.annealed, guidance.temperature)
    cfg = model.config
    T, N = cfg.tokens, cfg.blocks
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(batch, T, cfg.token_dim, generator=gen).to(device, dtype)
    y = (torch.arange(batch) % cfg.num_classes).to(device) if cfg.conditional else None
    z = noise * model.var.sqrt()
    row = {"config": name, "tokens": T, "blocks": N, "width": cfg.width, "batch": batch, "dtype": args.dtype,
           "device": device.type, "guidance": f"{guidance.weight} {guidance.what} tau_u={guidance.temperature}"}

    def prefix(limit):
        """(steps, extrapolation factor): a prefix of one block, or every step when limit is None."""
        if limit is None or limit >= T - 1:
            return None, 1.0
        return limit, N * (T - 1) / limit
    engine_steps, engine_scale = prefix(args.max_steps)
    textbook_steps, textbook_scale = prefix(min(filter(None, [args.max_steps, args.max_textbook_steps]), default=None))

    engine = Engine(model.blocks, batch, guidance, bf16)
    engine.set_labels(y)
    capture = engine.capture() if engine.graphs else 0.0

    def textbook_run(steps):
        if steps is None:
            return textbook.inverse(model, z, y, guidance, bf16)
        with autocast(device, bf16):
            return textbook.block_inverse(model.blocks[-1], z, y, guidance, steps=steps)

    def engine_run(steps):
        return engine.inverse(z, y) if steps is None else engine.block_inverse(N - 1, z, steps=steps)
    slow_out, slow_s, slow_peak = timed(lambda: textbook_run(textbook_steps), args.textbook_repeat)
    fast_out, fast_s, fast_peak = timed(lambda: engine_run(engine_steps))
    if textbook_steps != engine_steps:                      # compare like with like: the textbook's prefix
        fast_out = engine_run(textbook_steps)

    images = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=gen).to(device, dtype)
    with torch.no_grad(), autocast(device, bf16):
        _, forward_s, _ = timed(lambda: model(images, y), warm_up=True)

    gsj_s, gsj_strategy = (None, "not timed with --max-steps") if engine_steps else \
        gs_jacobi(model, noise, y, guidance, strategy, bf16, timed)
    row.update(textbook_steps=textbook_steps, engine_steps=engine_steps, textbook_s=slow_s * textbook_scale,
               engine_s=fast_s * engine_scale, capture_s=capture, gs_jacobi_s=gsj_s,
               gs_jacobi_strategy=gsj_strategy, forward_s=forward_s,
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
            "b/c", "(d) forward s", "b/d", "max|a-b|", "capture s", "peak MiB a / b"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gsj = r["gs_jacobi_s"]
        peak = "n/a" if r["peak_mib_textbook"] is None else f"{r['peak_mib_textbook']:.0f} / {r['peak_mib_engine']:.0f}"
        cells = [r["config"], r["tokens"], r["batch"], r["dtype"], r["guidance"], fmt(r["textbook_s"], r["textbook_steps"]),
                 fmt(r["engine_s"], r["engine_steps"]), f"{r['textbook_s'] / r['engine_s']:.1f}x",
                 fmt(gsj) if gsj else f"n/a ({r['gs_jacobi_strategy']})",
                 f"{r['engine_s'] / gsj:.1f}x" if gsj else "n/a", fmt(r["forward_s"]),
                 f"{r['engine_s'] / r['forward_s']:.0f}x", f"{r['max_abs_diff']:.1e}", f"{r['capture_s']:.2f}", peak]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    notes = [f"- {r['config']}: ~ {name} extrapolated from the first {r[key]} tokens of one block (a lower "
             "bound); max|a-b| over that prefix" for r in rows
             for name, key in [("(a)", "textbook_steps"), ("(b)", "engine_steps")] if r[key]]
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
                        help="time only this many tokens of one block for (a) and (b) and extrapolate")
    parser.add_argument("--max-textbook-steps", type=int, default=None,
                        help="the same for (a) alone (a full-size textbook run takes minutes on a GPU)")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs for (b), (c), (d)")
    parser.add_argument("--textbook-repeat", type=int, default=1, help="best of this many runs for (a)")
    parser.add_argument("--out-scale", type=float, default=0.1,
                        help="proj_out scale of the random weights (small keeps random samples finite)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance weight for every configuration, 0 = off (default: the published one)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (more threads on a busy machine only add waiting)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the process's CPU time (steadier on a shared machine; CPU runs with 1 thread only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path")
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

    rows = []
    for name in names:
        for batch in batches:
            rows.append(run_config(name, batch, args, device))
            print(f"done {name} B={batch}", file=sys.stderr, flush=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device.type} ({gpu}), torch {torch.__version__}, {args.threads} CPU threads, "
          f"{args.clock} clock")
    print(table(rows))
    if args.json:
        meta = {"device": device.type, "device_name": gpu, "torch": torch.__version__, "threads": args.threads,
                "clock": args.clock, "command": " ".join(sys.argv)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
