"""The package as a user installs it (pyproject.toml): the wheel built from this checkout, in a
fresh virtual environment with only its declared dependencies (torch first, as setup.sh does).

Each command runs once through the console script (each run costs seconds: a torch import). With
the core alone: sample, trace and fid (the bundled statistics file ships in the wheel) work; bpd
and fid-stats on the digits and the course's `assignments` stop with one line naming the extra to
install. With the `digits` extra: bpd, fid-stats and a few training steps.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.install


def run(*command, cwd, env=None):
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_in_a_fresh_environment_with_only_its_dependencies(tmp_path):
    source = tmp_path / "source"                      # a copy: the build leaves build/ and *.egg-info behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "tarflow_ref", source / "tarflow_ref", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    # --no-compile: byte-compiling every file of torch, scipy and sympy would take most of the time
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]
    for step in ([*pip, "torch==2.13.0"],                                                 # the CPU build, first
                 [venv / "bin" / "python", "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", source]):
        done = run(*step, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    wheel = next((tmp_path / "dist").glob("tarflow_ref-*.whl"))
    done = run(*pip, wheel, cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}       # nothing of this checkout
    env["OMP_NUM_THREADS"] = "1"
    work = tmp_path / "work"
    work.mkdir()
    tool = venv / "bin" / "tarflow-ref"

    def command(*args, code=0):
        done = run(tool, *args, cwd=work, env=env)
        assert done.returncode == code, done.stderr
        return done

    command("sample", "--n", "4", "--out", "samples.png")
    command("trace", "--n", "2", "--out", "trace.png")
    assert command("fid", "--n", "16", "--batch-size", "16").stdout.startswith("sampler: seq;")
    assert Image.open(work / "samples.png").size[0] > 0 and Image.open(work / "trace.png").size[0] > 0
    done = command("bpd", code=2)
    assert done.stderr == ("tarflow-ref bpd: error: the digits data set needs the optional package "
                           "scikit-learn: pip install 'tarflow_ref[digits]' (see --help)\n")
    done = command("fid-stats", "--data", "digits", "--out", "digits.pth", code=2)
    assert done.stderr.count("\n") == 1 and "pip install 'tarflow_ref[digits]'" in done.stderr
    done = command("assignments", "release", "--out", "student", code=2)
    assert done.stderr.count("\n") == 1 and "pip install 'tarflow_ref[course]'" in done.stderr

    done = run(*pip, f"{wheel}[digits]", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert command("bpd").stdout.startswith("bits/dim 6.5")
    assert command("fid-stats", "--data", "digits", "--out", "digits.pth").stdout.startswith("wrote digits.pth (360")
    done = command("train", "--patch", "2", "--blocks", "1", "--steps", "3", "--warmup", "1", "--batch-size", "16")
    assert done.stdout.startswith("wrote digits_model_2_64_1_1_0.10.pth after 3 of 3 steps")
