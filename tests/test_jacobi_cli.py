"""`python -m tarflow_ref sample --sampler gsj --strategy ...` on the bundled model: the strategy
reaches the GS-Jacobi sampler (a sequential strategy reproduces --sampler seq bit for bit; 'auto'
comes close to it without being it), and a bad strategy stops with exit code 2 and one clear line
(the messages themselves are tested in test_strategy.py)."""
import subprocess
import sys

import numpy as np
import pytest


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tarflow_ref", "sample", "--n", "3", "--batch-size", "3",
                           "--no-denoise", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_strategies_reach_the_gs_jacobi_sampler(tmp_path):
    done = {}
    for name, args in {"seq": ["--sampler", "seq"],
                       "gsj-sequential": ["--sampler", "gsj", "--strategy", "G=[0,0,0,0] J=[1,1,1,1]"],
                       "gsj-auto": ["--sampler", "gsj", "--strategy", "auto"]}.items():
        result = run(*args, "--out", f"{name}.png", "--npy", f"{name}.npy", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / f"{name}.png").is_file()
        done[name] = np.load(tmp_path / f"{name}.npy")
    assert np.array_equal(done["gsj-sequential"], done["seq"])
    deviation = np.abs(done["gsj-auto"] - done["seq"]).max()
    assert 0 < deviation < 1e-3                                          # auto_strategy's default tolerance


@pytest.mark.parametrize("args, message", [
    (["--sampler", "gsj", "--strategy", "G=[3,1,1,1] J=[2,2,2,2]"],
     "--strategy: G[0] = 3 cannot cut the T = 64 tokens into equal modules"),
    (["--sampler", "gsj", "--strategy", "afhq"], "--strategy: unknown strategy preset 'afhq'"),
    (["--strategy", "[3-8-4-4]"], "--strategy needs --sampler gsj"),
])
def test_bad_strategies_exit_2_with_one_line(tmp_path, args, message):
    result = run(*args, "--out", "x.png", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
