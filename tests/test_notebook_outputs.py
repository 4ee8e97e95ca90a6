"""Stored notebook outputs print nothing at rounding level (notebooks/ and assignments/, which CI
compares with nbval).

A number printed at the level of a computation's rounding errors depends on the machine (its
BLAS kernels, its threads, its vector units), not on the mathematics, and fails nbval on another
correct machine. Such a quantity is printed as a bound (`< 1e-12`) or rounded. Flagged in every
text output:

* a nonzero number below 1e-12 in magnitude, in any notation (4.4e-15, 0.0000000000003);
* a zero in scientific notation (0.0e+00): an error measure that may read 1.1e-16 elsewhere;
* a negative zero (-0.000): the sign of a rounding error;
* a decimal with 14 or more significant digits (a float's full repr, 0.30000000000000004);

unless it follows a comparison (<, <=, ≤, >, >=, ≥, below, under), where it is a threshold.
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "assignments").glob("*.ipynb"))
NUMBER = re.compile(r"(?<![\w.])[-+]?(?P<mantissa>\d+\.?\d*|\.\d+)(?:[eE](?P<exponent>[-+]?\d+))?(?![\w.])")
THRESHOLD = re.compile(r"(<=?|≤|>=?|≥|\bbelow|\bunder)\s*$")


def rounding_level(text: str) -> list:
    """The numbers in `text` printed at rounding level (module docstring)."""
    found = []
    for m in NUMBER.finditer(text):
        if THRESHOLD.search(text[:m.start()]):
            continue
        number, mantissa, exponent = m.group(0), m.group("mantissa"), m.group("exponent")
        value = float(number)
        digits = len(re.sub(r"\D", "", mantissa).lstrip("0"))
        if (0 < abs(value) < 1e-12 or (value == 0 and exponent is not None)
                or (value == 0 and number.startswith("-") and "." in number)
                or ("." in mantissa and digits >= 14)):
            found.append(number)
    return found


def text_outputs(cell) -> list:
    texts = []
    for output in cell.get("outputs", []):
        texts.append("".join(output.get("text", "")))
        texts.append("".join(output.get("data", {}).get("text/plain", "")))
    return [t for t in texts if t]


@pytest.mark.parametrize("example, flagged", [
    ("max error 4.4e-15", ["4.4e-15"]),
    ("max difference 0.0e+00", ["0.0e+00"]),
    ("array([1.00000000e+00, 2.22044605e-16])", ["2.22044605e-16"]),
    ("difference 0.0000000000003", ["0.0000000000003"]),
    ("logdet -0.000", ["-0.000"]),
    ("sum 0.30000000000000004", ["0.30000000000000004"]),
    ("mean 1.0000000000000002 and 6.543", ["1.0000000000000002"]),
    ("max diff < 1e-12: True", []),
    ("error below 1e-13, tolerance <= 1e-15", []),
    ("max error 4.4e-12 after 20 iterations, 0 tokens, loss -0.7707", []),
    ("+0.1558598313 agree: True; seed 12345678901234", []),
])
def test_the_detector(example, flagged):
    assert rounding_level(example) == flagged


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[f"{p.parent.name}/{p.name}" for p in NOTEBOOKS])
def test_no_stored_output_prints_a_rounding_level_number(path):
    cells = json.loads(path.read_text())["cells"]
    offenders = [f"cell {i}: {number} in {line.strip()!r}"
                 for i, cell in enumerate(cells) if cell["cell_type"] == "code"
                 for text in text_outputs(cell) for line in text.splitlines()
                 for number in rounding_level(line)]
    assert not offenders, "print these as a bound (< 1e-12) or rounded:\n" + "\n".join(offenders)
