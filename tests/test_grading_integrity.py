"""What the reading of a submission's code flags (tarflow_ref/grading/integrity.py), on the real
assignments 01-03: the package beyond what the assignment hands out, the grading machinery, code the
grader cannot read; and what it leaves alone (NumPy, the handed-out problems, the checks, magics
that only time code, docstrings)."""
import nbformat
import pytest

from tarflow_ref.grading.course import ASSIGNMENTS, grade_cells, student_version, with_instructors_checks
from tarflow_ref.grading.integrity import Assignment, scan


def key(name):
    return nbformat.read(ASSIGNMENTS / name, as_version=4)


def flags_of(name, cells: dict, extra=None):
    """The flags of the student version of assignment `name` with solution cells written (grade_id
    -> source, appended to the stub) and an extra cell appended at the end."""
    instructor = key(name)
    nb = student_version(instructor)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in cells:
            cell.source = cells[grade_id] + "\n" + cell.source
    if extra is not None:
        nb.cells.append(nbformat.v4.new_code_cell(extra))
    return scan(with_instructors_checks(nb, grade_cells(instructor), name), Assignment(instructor))


FLOW = "02_affine_flow.ipynb"


@pytest.mark.parametrize("code, kind, what", [
    ("from tarflow_ref.flow import block_inverse", "reference", "imports tarflow_ref.flow.block_inverse"),
    ("import tarflow_ref", "reference", "imports tarflow_ref"),
    ("from tarflow_ref import flow as F\nF.shift", "reference", "imports tarflow_ref.flow"),
    ("x = 'tarflow_ref.flow'", "reference", "names the package in a string"),
    ("check_shift = print", "machinery", "rebinds check_shift"),
    ("del check_flow_inverse", "machinery", "rebinds check_flow_inverse"),
    ("def toy_conditioner(seed):\n    pass", "machinery", "rebinds toy_conditioner"),
    ("global check_shift", "machinery", "rebinds check_shift"),
    ("np.exp = np.sin", "machinery", "assigns into np.exp (monkeypatching)"),
    ("check_shift.__code__ = print.__code__", "machinery", "uses .__code__"),
    ("get_ipython().set_custom_exc((BaseException,), print)", "machinery", "uses .set_custom_exc"),
    ("globals()['check_shift'] = print", "machinery", "uses globals()"),
    ("setattr(np, 'exp', np.sin)", "machinery", "uses setattr"),
    ("import sys\nsys.modules['numpy'] = None", "machinery", "uses sys.modules"),
    ("import sys\nsys.modules.pop('numpy')", "machinery", "uses sys.modules"),
    ("import sys\nsys.path.insert(0, '.')", "machinery", "uses sys.path"),
    ("consts = check_shift.__code__.co_consts", "machinery", "uses .__code__"),
    ("import importlib", "machinery", "imports importlib"),
    ("import inspect", "machinery", "imports inspect"),
    ("f, pb = toy_conditioner(0)\nf.__closure__", "machinery", "uses .__closure__"),
    ("exec('x = 1')", "opaque", "runs code from a string (exec)"),
    ("__import__('math')", "opaque", "imports by __import__"),
    ("name = 'exp'\ngetattr(np, name)", "opaque", "getattr with a computed attribute name"),
    ("!ls", "opaque", "runs a shell command"),
    ("import subprocess", "opaque", "imports subprocess"),
    ("import os\nos.system('ls')", "opaque", "runs another program (os.system)"),
    ("import my_own_module", "opaque", "imports my_own_module, which the grader cannot read"),
])
def test_each_rule_flags_its_line_in_its_part(code, kind, what):
    flags = flags_of(FLOW, {"flow_forward": code})
    assert flags, code
    assert any(f.kind == kind and f.what.startswith(what) for f in flags), [f.describe() for f in flags]
    flag = next(f for f in flags if f.what.startswith(what))
    assert flag.part == "check_flow_forward" and flag.where.startswith("cell ") and flag.line in code


@pytest.mark.parametrize("name, code", [
    (FLOW, "f2, pb = toy_conditioner(3)\nT, D = TOY.tokens, TOY.token_dim\nz = toy_noise(1)"),   # the problems
    (FLOW, "check_shift(shift)"),                                                             # a check, re-run
    (FLOW, "%timeit np.zeros(3)\n%matplotlib inline"),
    (FLOW, 'def helper(o):\n    """Like tarflow_ref.flow.shift, by hand."""\n    return np.roll(o, 1, axis=1)'),
    (FLOW, "import math, itertools\nfrom scipy import special\ngetattr(np, 'zeros')"),
    ("01_causal_attention.ipynb", "from tarflow_ref.attention import KVCache\ncache = KVCache(1, 2, 3, 4)"),
    ("03_jacobi.ipynb", "pb2 = toy_conditioner(6)[1]"),
])
def test_what_the_assignment_hands_out_is_not_flagged(name, code):
    grade_id = {"01_causal_attention.ipynb": "decode", "03_jacobi.ipynb": "jacobi_update"}.get(name, "flow_forward")
    assert flags_of(name, {grade_id: code}) == []


def test_a_name_bound_to_flagged_code_carries_the_flag_into_later_parts():
    flags = flags_of(FLOW, {"shift": "from tarflow_ref.flow import block_inverse as bi\n"
                                     "def invert(z, pb):\n    return bi(pb, z, None, TOY)",
                            "flow_inverse": "def flow_inverse(z, f):\n    return invert(z, toy_conditioner(0)[1])"})
    parts = [(f.part, f.what) for f in flags]
    assert ("check_shift", "imports tarflow_ref.flow.block_inverse, the package's own code") in parts
    assert any(part == "check_flow_inverse" and what.startswith("uses invert (a function using flagged code")
               for part, what in parts), parts


def test_a_module_the_notebook_imports_is_flagged_by_what_is_used_of_it():
    """Assignment 03 imports tarflow_ref.flow for its picture: its block_inverse is still off limits."""
    flags = flags_of("03_jacobi.ipynb", {"jacobi_inverse": "x = flow.block_inverse(pb, z, None, TOY)"})
    assert [(f.part, f.kind, f.what) for f in flags] == [
        ("check_jacobi_inverse", "reference", "uses tarflow_ref.flow.block_inverse, the package's own code")]


def test_code_after_the_last_check_belongs_to_no_part_and_given_cells_are_not_read():
    flags = flags_of(FLOW, {}, extra="from tarflow_ref.flow import block_inverse")
    assert [(f.part, f.what.split(",")[0]) for f in flags] == [(None, "imports tarflow_ref.flow.block_inverse")]
    instructor = key("03_jacobi.ipynb")                       # its given cells import and use tarflow_ref.flow
    nb = with_instructors_checks(instructor, grade_cells(instructor), "03")
    assert scan(nb, Assignment(instructor)) == []
    nb.cells[2].source += "\nflow.block_inverse"             # a given cell the student changed is read
    assert [f.what for f in scan(nb, Assignment(instructor))] == [
        "uses tarflow_ref.flow.block_inverse, the package's own code"]
