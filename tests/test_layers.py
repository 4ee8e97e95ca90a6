"""The layering: the top-level modules of tarflow_ref/ are the NumPy reference and import no torch;
the code passes the linter; the README's module table lists exactly the package's files."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "tarflow_ref"

# a fresh interpreter in which importing torch fails: every NumPy module must import and run without it
NO_TORCH = r'''
import importlib, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked: the NumPy reference must not need it")

sys.meta_path.insert(0, NoTorch())
import numpy as np
import tarflow_ref as tf
for name in sys.argv[1:]:
    importlib.import_module(f"tarflow_ref.{name}")
from tarflow_ref import backward, denoising, diagnostics, jacobi, model, params
cfg = tf.TarFlowConfig(image_size=4, patch_size=2, channels=1, width=16, blocks=2, layers=1, num_classes=2,
                       head_dim=8, noise_std=0.1)
p = params.random_params(cfg, seed=1)
x = np.random.default_rng(0).uniform(-1, 1, (2, 1, 4, 4))
z, logdet = model.forward(p, cfg, x, np.array([0, -1]))
noise = np.random.default_rng(1).standard_normal((2, cfg.tokens, cfg.token_dim))
image = model.sample(p, cfg, noise, None, tf.Guidance(1.0))
strategy = tf.parse_strategy("G=[1,4] J=[3,1]", cfg)
gsj = model.sample(p, cfg, noise, None, tf.Guidance(1.0), sampler=jacobi.gs_jacobi(strategy))
assert np.abs(gsj - image).max() < 1e-12 * np.abs(image).max()
denoising.denoise(p, cfg, x)
diagnostics.diagnose(p, cfg, x)
assert tf.PRESETS and "torch" not in sys.modules
print("no torch:", sorted(m for m in sys.modules if m.startswith("tarflow_ref.")))
'''


def numpy_modules():
    """Every top-level module of the package: by the layering, each is NumPy reference."""
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))


def test_numpy_reference_imports_and_runs_without_torch():
    names = numpy_modules()
    assert {"flow", "model", "jacobi", "attention", "validation", "params"} <= set(names)
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    imported = set(re.findall(r"'tarflow_ref\.(\w+)'", done.stdout))
    assert set(names) <= imported


def test_ruff_check_passes():
    """The linter and the layout (format) check configured in pyproject.toml ([tool.ruff]) find nothing."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "tarflow_ref", "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def module_table():
    """The paths in the first column of the README's module table (section "Architecture")."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Module table", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [path for row in rows for path in re.findall(r"`([\w/.]+)`", row.split("|")[1])]


def holds_code(path):
    """False for a module that is only a docstring (a sub-package's __init__.py)."""
    body = ast.parse(path.read_text()).body
    return bool(body[1:] if body and isinstance(body[0], ast.Expr) else body)


def test_readme_module_table_matches_the_tree():
    """Each .py file of the package that holds code is in the table once (a folder entry `x/` covers
    a folder that one layer owns as a whole), and each entry exists."""
    listed = module_table()
    assert len(listed) == len(set(listed)), "an entry appears twice"
    folders = [entry for entry in listed if entry.endswith("/")]
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if holds_code(p)}
    covered = {f for f in files if f in listed or any(f.startswith(folder) for folder in folders)}
    assert files - covered == set(), "modules missing from the README's table"
    assert {entry for entry in listed if entry not in folders and not (PACKAGE / entry).is_file()} == set(), \
        "the README's table names files that do not exist"
    assert all((PACKAGE / folder).is_dir() for folder in folders)
