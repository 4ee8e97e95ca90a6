"""The bundled tiny model: a conditional TarFlow trained on scikit-learn's digits by training/train.py.

`bundled_checkpoint()` is its path; it loads like any released file (`load_checkpoint`), and is
the default model of the command line. `bundled_fid_stats()` is the FID statistics file of the
held-out digits (evaluation/digit_features.py). README.md beside this file records the exact
commands that made them and the numbers measured on them.
"""
from pathlib import Path

BUNDLED_NAME = "digits_model_1_64_4_1_0.10.pth"
BUNDLED_STATS = "digits_8_fid_stats.pth"        # FID statistics of the 360 held-out digits, with their feature network

# what `python -m tarflow_ref sample` uses with the bundled model unless told otherwise
BUNDLED_GUIDANCE = 1.0

TRAINING_COMMAND = ("python -m tarflow_ref train --data digits --patch 1 --width 64 --blocks 4 --layers 1 "
                    "--sigma 0.10 --steps 2000 --warmup 100 --batch-size 64 --lr 1e-3 --seed 0 "
                    "--out-dir tarflow_ref/assets")


def bundled_checkpoint() -> Path:
    """The path of the bundled tiny digits model (a plain state dict in the released format)."""
    path = Path(__file__).with_name(BUNDLED_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"the bundled model {path} is missing; re-create it with: {TRAINING_COMMAND}")
    return path


def bundled_fid_stats() -> Path:
    """The FID statistics file of the 360 held-out digits, in the released layout, holding the digit
    feature network (read it with evaluation.fid.read_stats_file)."""
    path = Path(__file__).with_name(BUNDLED_STATS)
    if not path.is_file():
        raise FileNotFoundError(f"the bundled statistics file {path} is missing; re-create it with: "
                                f"python -m tarflow_ref.evaluation.digit_features --out {path}")
    return path
