"""A student who games the grade of assignment 02 instead of writing it earns nothing for what it did
not write, and the report names the line (tarflow_ref/grading/course.py, integrity.py, remote.py).

When the grade cells ran inside the student's kernel, rebinding the checks, swallowing every error
with set_custom_exc and rewriting the checks' code each scored 10/10 with every function still
raising NotImplementedError, and an inverse that calls the package's own scored 10/10 unnoticed.
"""
import nbformat
import pytest

from tarflow_ref.grading import course
from tarflow_ref.grading.course import ASSIGNMENTS, grade, student_version
from tarflow_ref.grading.gradebook import find_submissions, grade_class

KEY = ASSIGNMENTS / "02_affine_flow.ipynb"

SHIFT = """def shift(o):
    out = np.zeros_like(o)
    out[:, 1:] = o[:, :-1]
    return out
"""
FORWARD = """def flow_forward(u, f):
    a, m = f(u)
    a, m = shift(a), shift(m)
    return (u - m) * np.exp(-a), -a.mean(axis=(1, 2))
"""
# the package's inverse on the block behind f, found among the seeded toy blocks
REFERENCE_INVERSE = """from tarflow_ref.flow import block_inverse

def flow_inverse(z, f):
    a, _ = f(z)
    for seed in range(10):
        g, pb = toy_conditioner(seed)
        if np.allclose(g(z)[0], a):
            return block_inverse(pb, z, None, TOY)
"""
# the same, hidden from a reading of the code: what only the kernel's agent can see
HIDDEN_INVERSE = REFERENCE_INVERSE.replace("from tarflow_ref.flow import block_inverse\n",
                                           "block_inverse = getattr(__import__('tarflow_' + 'ref.flow', "
                                           "fromlist=['x']), 'block_' + 'inverse')\n")

STUB = "{stub}"            # the solution cell as released: a stub that raises NotImplementedError
CHEATS = {      # name: the solution cells it writes ({stub}: the released stub, kept)
    "rebinds-the-checks": {"shift": "check_shift = check_flow_forward = check_flow_inverse = lambda fn: print('PASS')\n"
                                    + STUB},
    "swallows-errors": {"shift": "get_ipython().set_custom_exc((BaseException,), lambda *a, **k: None)\n" + STUB},
    "rewrites-code": {"shift": "import tarflow_ref.grading.flow as g\n"
                               "g.check_shift.__code__ = g.check_flow_forward.__code__ = g.check_flow_inverse.__code__"
                               " = (lambda fn: print('PASS')).__code__\n" + STUB},
    "monkeypatches": {"shift": "import sys, types\nimport tarflow_ref.grading.flow as g\n"
                               "g.check_flow_inverse = lambda fn: print('PASS')\n"
                               "sys.modules['tarflow_ref.grading.flow'] = types.SimpleNamespace(check_shift=print)\n"
                               + STUB},
    "replaces-the-agent": {"shift": "import tarflow_ref.grading.remote as agent\nagent.serve = lambda: None\n" + STUB},
    "calls-the-reference": {"shift": SHIFT, "flow_forward": FORWARD, "flow_inverse": REFERENCE_INVERSE},
}


def submission(path, cells: dict):
    """The student version of assignment 02 with solution cells (grade_id -> source) written, to path."""
    nb = student_version(nbformat.read(KEY, as_version=4))
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in cells:
            cell.source = cells[grade_id].replace(STUB, cell.source)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def points(report):
    return {s.grade_id: s.earned for s in report.scores}


@pytest.fixture(scope="module")
def cheats(tmp_path_factory):
    """name -> the report of each cheat, graded as one class two at a time."""
    folder = tmp_path_factory.mktemp("cheats")
    for name, cells in CHEATS.items():
        submission(folder / name / KEY.name, cells)
    submissions = find_submissions([folder], {KEY.name: KEY})
    reports = grade_class(submissions, jobs=2, timeout=300)
    return {s.student: r for s, r in zip(submissions, reports)}


@pytest.mark.parametrize("name, flagged", [
    ("rebinds-the-checks", ["rebinds check_shift", "rebinds check_flow_forward", "rebinds check_flow_inverse"]),
    ("swallows-errors", ["get_ipython", ".set_custom_exc", "set_custom_exc installed an exception handler"]),
    ("rewrites-code", ["imports tarflow_ref.grading.flow", ".__code__",
                       "tarflow_ref.grading.flow.check_shift.__code__ was rewritten"]),
    ("monkeypatches", ["assigns into g.check_flow_inverse (monkeypatching)", "uses sys.modules",
                       "tarflow_ref.grading.flow.check_flow_inverse was replaced",
                       "sys.modules['tarflow_ref.grading.flow'] was replaced"]),
    ("replaces-the-agent", ["imports tarflow_ref.grading.remote", "assigns into agent.serve",
                            "the grader's agent in the kernel was replaced or broken"]),
])
def test_tampering_with_the_checks_earns_nothing_and_is_flagged(cheats, name, flagged):
    report = cheats[name]
    assert points(report) == {"check_shift": 0, "check_flow_forward": 0, "check_flow_inverse": 0}, report.text()
    whats = [flag.what for flag in report.flags]
    for expected in flagged:
        assert any(expected in what for what in whats), (expected, report.text())
    assert all(flag.part == "check_shift" for flag in report.flags), report.text()
    static = [flag for flag in report.flags if flag.where.startswith("cell ")]
    assert static and all(flag.line for flag in static)            # the report shows the line


def test_calling_the_reference_scores_that_part_zero_unless_allowed(cheats, tmp_path):
    report = cheats["calls-the-reference"]
    assert points(report) == {"check_shift": 2, "check_flow_forward": 4, "check_flow_inverse": 0}, report.text()
    assert report.scores[2].reason == "flagged (would earn 4; see the flags)"
    flags = {(flag.part, flag.kind, flag.what) for flag in report.flags}
    assert ("check_flow_inverse", "reference",
            "imports tarflow_ref.flow.block_inverse, the package's own code") in flags
    assert ("check_flow_inverse", "reference", "called tarflow_ref.flow.block_inverse") in flags    # seen in the kernel
    line = next(flag for flag in report.flags if flag.line.startswith("return block_inverse"))
    assert line.where.startswith("cell ") and line.part == "check_flow_inverse"

    allowed = grade(submission(tmp_path / KEY.name, CHEATS["calls-the-reference"]), KEY, allow_reference=True)
    assert allowed.earned == 10 and allowed.flags and "--allow-reference" in allowed.text()


def test_the_kernels_agent_sees_a_reference_call_the_reading_misses(tmp_path, monkeypatch):
    """With the reading of the code blinded, the profile hook in the kernel still flags the call."""
    monkeypatch.setattr(course, "scan", lambda nb, assignment: [])
    hidden = {**CHEATS["calls-the-reference"], "flow_inverse": HIDDEN_INVERSE}
    report = grade(submission(tmp_path / KEY.name, hidden), KEY)
    assert points(report) == {"check_shift": 2, "check_flow_forward": 4, "check_flow_inverse": 0}, report.text()
    assert [(flag.part, flag.what) for flag in report.flags] == [
        ("check_flow_inverse", "called tarflow_ref.flow.block_inverse")]
