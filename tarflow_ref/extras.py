"""Optional packages, and the extra of pyproject.toml that installs each.

`pip install tarflow_ref` brings what sampling, tracing, evaluating and training on image folders
need (numpy, torch, einops, scipy, pillow, tqdm). The rest is optional, grouped in extras:

    digits      scikit-learn: the bundled digits data set (train --data digits, bpd's default data)
    notebooks   the tutorials: matplotlib, jupyter, scikit-learn
    course      the course assignments: release and grading (nbgrader, nbconvert, nbclient, nbformat)
    book        building the book (jupyter-book)
    hub         downloading the released checkpoints and FID statistics files (huggingface_hub)
    test        the test suite (pytest, nbval) with everything above but the book

A missing optional package ends in one line that names the extra to install (`require`, and the
command line for any import deeper down).
"""
from __future__ import annotations

import importlib

EXTRAS = {  # import name: (package to install, extra)
    "sklearn": ("scikit-learn", "digits"),
    "matplotlib": ("matplotlib", "notebooks"),
    "nbformat": ("nbformat", "course"),
    "nbclient": ("nbclient", "course"),
    "nbconvert": ("nbconvert", "course"),
    "nbgrader": ("nbgrader", "course"),
    "huggingface_hub": ("huggingface_hub", "hub"),
}


class MissingExtra(ModuleNotFoundError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str):
    """importlib.import_module(module), or MissingExtra naming the extra when it is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        message = missing_extra_message(err, purpose)
        if message is None:
            raise
        raise MissingExtra(message, name=err.name) from None


def missing_extra_message(err: ModuleNotFoundError, purpose: str = "this") -> str | None:
    """One line naming the extra that installs the module `err` did not find; None if it is no
    optional package of ours (a broken installation, which needs its traceback)."""
    top = (err.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    package, extra = EXTRAS[top]
    return f"{purpose} needs the optional package {package}: pip install 'tarflow_ref[{extra}]'"
