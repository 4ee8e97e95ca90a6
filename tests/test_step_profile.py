"""benchmarks/step_profile.py on the CPU: it profiles the graph body the CUDA graphs record, and
its counts show the engine's structure: ONE pass per step for both guidance branches."""
import importlib.util
import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_script(name):
    sys.path.insert(0, str(BENCHMARKS))          # step_profile imports its sibling sampling.py
    try:
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def per_step(out, op):
    return int(re.search(rf"\| aten::{op} \| (\d+) \|", out).group(1))


def test_step_profile_counts_one_batched_pass_per_step(capsys):
    """The 'quick' model has L = 2 layers: a step runs proj_in, 4 Linear per layer and proj_out
    (4 L + 2 = 10) and L attentions, once for the batch of 2B; two branch passes would double them."""
    profile = load_script("step_profile")
    profile.main(["--config", "quick", "--batch", "2", "--steps", "3", "--device", "cpu", "--top", "40"])
    out = capsys.readouterr().out
    assert per_step(out, "linear") == 10 and per_step(out, "scaled_dot_product_attention") == 2
    profile.main(["--config", "quick", "--batch", "2", "--steps", "3", "--device", "cpu", "--top", "40",
                  "--guidance", "0"])
    out = capsys.readouterr().out
    assert per_step(out, "linear") == 10 and "positions 32..34 of block 1" in out
