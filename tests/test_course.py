"""Handing out and grading the course assignments (tarflow_ref/grading/course.py, gradebook.py, the
CLI's `assignments`), on a small instructor notebook made here and on the real assignments/.

Grading runs each notebook in a contained kernel (as root, which CI is: its own user id and
namespaces) and its grade cells in the test's process."""
import csv
import shutil

import nbformat
import pytest

from tarflow_ref.cli import main
from tarflow_ref.grading.course import ASSIGNMENTS, Report, find_notebooks, grade, release, student_version
from tarflow_ref.grading.gradebook import find_submissions, grade_class

SOLUTION = "    ### BEGIN SOLUTION\n    return a + b\n    ### END SOLUTION"


def meta(grade_id, solution=False, points=None):
    m = {"grade_id": grade_id, "schema_version": 3, "solution": solution, "task": False,
         "grade": points is not None, "locked": not solution}
    if points is not None:
        m["points"] = points
    return {"nbgrader": m}


def instructor(solution=SOLUTION):
    """add(a, b) as the student's part, worth 2 + 1 points; one hidden test."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("Write `add`."),
        nbformat.v4.new_code_cell(f'def add(a, b):\n    """a + b"""\n{solution}', metadata=meta("add", solution=True)),
        nbformat.v4.new_code_cell("assert add(2, 3) == 5\nprint('PASS add')", metadata=meta("check_add", points=2)),
        nbformat.v4.new_code_cell("assert add(-1, 1) == 0\n### BEGIN HIDDEN TESTS\nassert add(0.5, 0.25) == 0.75\n"
                                  "### END HIDDEN TESTS", metadata=meta("check_more", points=1)),
    ]
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="PASS add\n")]
    return nb


def write(nb, path):
    nbformat.write(nb, path)
    return path


def sources(nb):
    return "\n".join(cell.source for cell in nb.cells)


def test_student_version_keeps_the_signature_and_removes_solutions_hidden_tests_and_outputs():
    nb = instructor()
    student = student_version(nb)
    text = sources(student)
    assert "return a + b" not in text and "BEGIN SOLUTION" not in text
    assert 'def add(a, b):\n    """a + b"""\n    # YOUR CODE HERE\n    raise NotImplementedError()' in text
    assert "0.75" not in text and "assert add(-1, 1) == 0" in text
    assert all(not cell.get("outputs") for cell in student.cells)
    assert "return a + b" in sources(nb)                                # the instructor's copy is untouched


def test_release_writes_nothing_over_existing_files_without_force(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = [write(instructor(), src / "a.ipynb"), write(instructor(), src / "b.ipynb")]
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.ipynb").write_text("the student's work")
    with pytest.raises(FileExistsError, match="b.ipynb"):
        release(paths, out)
    assert not (out / "a.ipynb").exists() and (out / "b.ipynb").read_text() == "the student's work"
    assert release(paths, out, force=True) == [out / "a.ipynb", out / "b.ipynb"]
    assert "raise NotImplementedError()" in sources(nbformat.read(out / "b.ipynb", as_version=4))


@pytest.mark.parametrize("broken, message", [
    ("no solution cells", "has no solution cells"),
    ("unclosed region", "no end solution"),
    ("region in an unmarked cell", "non-solution cell"),
])
def test_bad_markup_is_named(tmp_path, broken, message):
    nb = instructor()
    if broken == "no solution cells":
        nb.cells[1].metadata = {}
        nb.cells[1].source = "def add(a, b):\n    return a + b"
    elif broken == "unclosed region":
        nb.cells[1].source = nb.cells[1].source.replace("    ### END SOLUTION", "")
    else:
        nb.cells[2].source = "### BEGIN SOLUTION\nx = 1\n### END SOLUTION"
    with pytest.raises(ValueError, match=message):
        release([write(nb, tmp_path / "x.ipynb")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_find_notebooks_names_a_bad_source(tmp_path):
    with pytest.raises(ValueError, match="no .ipynb notebooks"):
        find_notebooks(tmp_path)
    with pytest.raises(ValueError, match="not a notebook"):
        find_notebooks(tmp_path / "missing.ipynb")
    (tmp_path / "bad.ipynb").write_text("{ not json")
    with pytest.raises(ValueError, match="not a readable notebook"):
        release([tmp_path / "bad.ipynb"], tmp_path / "out")


def points(report):
    return {s.grade_id: s.earned for s in report.scores}


def test_grading_scores_answers_and_restores_the_instructors_checks(tmp_path):
    key = write(instructor(), tmp_path / "key.ipynb")
    right = write(instructor(), tmp_path / "right.ipynb")
    assert points(grade(right, key)) == {"check_add": 2, "check_more": 1}

    blank = write(student_version(instructor()), tmp_path / "blank.ipynb")
    report = grade(blank, key)
    assert points(report) == {"check_add": 0, "check_more": 0}
    assert report.scores[0].reason.startswith("NotImplementedError") and not report.flags

    # a wrong answer whose student replaced the first check by `pass`: grading puts the check back
    cheat = instructor("    return a - b")
    cheat.cells[2].source = "pass"
    report = grade(write(cheat, tmp_path / "cheat.ipynb"), key)
    assert points(report) == {"check_add": 0, "check_more": 0}
    assert report.scores[0].reason.startswith("AssertionError")

    # right for whole numbers only, in the student version (which has no hidden test): the visible
    # tests pass, the hidden one (back at grading) does not
    halves = student_version(instructor())
    halves.cells[1].source = halves.cells[1].source.replace(
        "    # YOUR CODE HERE\n    raise NotImplementedError()", "    return int(a) + int(b)")
    assert points(grade(write(halves, tmp_path / "halves.ipynb"), key)) == {"check_add": 2, "check_more": 0}

    demoted = instructor()
    demoted.cells[3] = nbformat.v4.new_markdown_cell("assert True", metadata=demoted.cells[3].metadata)
    report = grade(write(demoted, tmp_path / "demoted.ipynb"), key)
    assert points(report) == {"check_add": 2, "check_more": 0} and "markdown" in report.scores[1].reason

    deleted = instructor()
    del deleted.cells[3]
    report = grade(write(deleted, tmp_path / "deleted.ipynb"), key)
    assert points(report) == {"check_add": 2, "check_more": 0} and report.scores[1].reason == "grade cell deleted"


def test_the_six_assignments_graded_as_a_class(tmp_path):
    """Every real assignment twice, as one class graded two at a time: its instructor version earns
    every point with no flag, its unanswered student version (which keeps no solution) nothing; the
    table has a row per submission and a column per part, and is not overwritten without force."""
    notebooks = find_notebooks(ASSIGNMENTS)
    unanswered = release(notebooks, tmp_path / "released")
    for key, student in zip(notebooks, unanswered):
        assert "BEGIN SOLUTION" not in sources(nbformat.read(student, as_version=4))
        (tmp_path / "class" / f"key-{key.stem}").mkdir(parents=True)
        shutil.copy(key, tmp_path / "class" / f"key-{key.stem}")
        (tmp_path / "class" / f"blank-{key.stem}").mkdir()
        shutil.copy(student, tmp_path / "class" / f"blank-{key.stem}")
    submissions = find_submissions([tmp_path / "class"], {p.name: p for p in notebooks})
    reports = grade_class(submissions, tmp_path / "out", jobs=2, timeout=300)
    assert len(reports) == 12 and all(isinstance(r, Report) for r in reports), reports
    for s, report in zip(submissions, reports):
        if s.student.startswith("key-"):
            assert report.earned == report.possible > 0 and not report.flags, report.text()
        else:
            assert report.earned == 0 and all(r.reason.startswith("NotImplementedError") for r in report.scores), \
                report.text()
    rows = list(csv.DictReader(open(tmp_path / "out" / "grades.csv")))
    assert [r["submission"] for r in rows] == [s.name for s in submissions]
    key_02 = next(r for r in rows if r["student"] == "key-02_affine_flow")
    assert (key_02["points"], key_02["check_flow_inverse"], key_02["check_softmax"]) == ("10", "4", "")
    assert all((tmp_path / "out" / "reports" / f"{s.name}.json").exists() for s in submissions)

    with pytest.raises(FileExistsError, match="grades.csv"):
        grade_class(submissions, tmp_path / "out")
    regraded = []
    again = grade_class(submissions, tmp_path / "out", resume=True, progress=lambda s, r: regraded.append(s),
                        timeout=300)
    assert not regraded and [r.earned for r in again] == [r.earned for r in reports]
    (tmp_path / "class" / "key-02_affine_flow" / "02_affine_flow.ipynb").write_text("changed")   # graded again
    again = grade_class(submissions, tmp_path / "out", resume=True, progress=lambda s, r: regraded.append(s),
                        timeout=300)
    assert [s.name for s in regraded] == ["key-02_affine_flow/02_affine_flow.ipynb"] and isinstance(again[7], str)


def test_cli_release_and_grade(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    key = write(instructor(), tmp_path / "src" / "hw.ipynb")
    release_argv = ["assignments", "release", "--source", str(key.parent), "--out", str(tmp_path / "out")]
    main(release_argv)
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'out' / 'hw.ipynb'}"
    with pytest.raises(SystemExit) as stop:
        main(release_argv)
    assert stop.value.code == 2 and "would overwrite" in capsys.readouterr().err

    main(["assignments", "grade", "--source", str(key.parent), str(tmp_path / "out"),
          "--out", str(tmp_path / "grades")])
    out = capsys.readouterr().out
    assert "hw.ipynb: 0 / 3 points" in out and "NotImplementedError" in out and "wrote" in out
    assert (tmp_path / "grades" / "grades.csv").read_text().splitlines()[1].startswith(",hw.ipynb,hw.ipynb,0,3,")

    write(nbformat.v4.new_notebook(), tmp_path / "other.ipynb")
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    for argv, message in (([str(tmp_path / "missing.ipynb")], "no such notebook"),
                          ([str(tmp_path / "other.ipynb")], "no assignment named other.ipynb"),
                          ([str(tmp_path / "empty")], "no notebook named like an assignment"),
                          ([str(tmp_path / "out"), "--out", str(tmp_path / "grades")], "would overwrite"),
                          ([str(tmp_path / "out"), "--out", str(tmp_path / "file")], "is a file"),
                          ([str(tmp_path / "out"), "--force"], "need --out"),
                          ([str(tmp_path / "out"), "--jobs", "0"], "argument --jobs: must be at least 1")):
        with pytest.raises(SystemExit) as stop:
            main(["assignments", "grade", "--source", str(key.parent), *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err, message


def test_grading_trusts_nothing_but_the_run(tmp_path):
    """Points come from the instructor's metadata, a cell the student marks as graded earns
    nothing, and a run that stops (a cell or a check over the time limit, a dead kernel) scores
    the unfinished checks 0 even where the submission carries old PASS outputs."""
    key = write(instructor(), tmp_path / "key.ipynb")
    greedy = instructor()
    greedy.cells[2].metadata.nbgrader["points"] = 100
    greedy.cells.append(nbformat.v4.new_code_cell("print('free points')", metadata=meta("bonus", points=50)))
    report = grade(write(greedy, tmp_path / "greedy.ipynb"), key)
    assert [(s.grade_id, s.earned, s.possible) for s in report.scores] == [("check_add", 2, 2), ("check_more", 1, 1)]

    for name, body, why in (("slow", "    import time\n    time.sleep(60)", "a cell ran over 3 s"),
                            ("dies", "    import os\n    os._exit(1)", "the kernel died"),
                            ("slow-answer", None, "a check ran over 3 s")):
        nb = instructor(SOLUTION if body else "    import time\n    time.sleep(60)")
        if body:
            nb.cells.insert(2, nbformat.v4.new_code_cell(f"def stop():\n{body}\nstop()"))
        report = grade(write(nb, tmp_path / f"{name}.ipynb"), key, timeout=3)
        assert [(s.earned, s.reason) for s in report.scores] == [(0, f"not finished: {why}")] * 2, name
