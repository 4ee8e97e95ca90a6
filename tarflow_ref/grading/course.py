"""Hand out and grade the course assignments (assignments/), in nbgrader's markup.

An assignment notebook is the instructor's version. nbgrader's cell metadata marks its
solution cells (the student's part lies between `### BEGIN SOLUTION` and `### END SOLUTION`) and
its grade cells (locked, worth `points`, calling the checks of tarflow_ref.grading).

    release:  instructor notebook -> student notebook. Each solution region becomes
              `# YOUR CODE HERE` + `raise NotImplementedError()` (nbgrader's ClearSolutions),
              regions between `### BEGIN HIDDEN TESTS` and `### END HIDDEN TESTS` go
              (ClearHiddenTests), and the outputs are cleared.
    grade:    student notebook -> points. Every grade cell is put back as the instructor wrote
              it (source and points), so editing, deleting or adding a check earns nothing; the
              outputs are cleared and the notebook runs top to bottom in a fresh kernel; a grade
              cell earns its points when it runs without an error (nbgrader's rule,
              nbgrader.utils.determine_grade), and nothing when the run stopped before it ended
              (a cell over the time limit, a dead kernel).

The markup is nbgrader's own, so an instructor running the full nbgrader (gradebook, feedback)
uses the same notebooks with `nbgrader generate_assignment` / `autograde`. Grading runs the
student's code: do it in a sandbox.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbconvert.preprocessors import ClearOutputPreprocessor
from nbgrader.preprocessors import ClearHiddenTests, ClearSolutions
from nbgrader.utils import determine_grade, is_grade, is_solution

from ..io.files import written_together

# the instructor notebooks of this repository (absent from a wheel: then pass a folder)
ASSIGNMENTS = Path(__file__).resolve().parents[2] / "assignments"


def find_notebooks(source) -> list[Path]:
    """source: one .ipynb or a folder of them -> the notebooks, sorted by name."""
    source = Path(source)
    if source.is_dir():
        found = sorted(source.glob("*.ipynb"))
        if not found:
            raise ValueError(f"no .ipynb notebooks in the folder {source}")
        return found
    if source.suffix != ".ipynb" or not source.is_file():
        raise ValueError(f"not a notebook or a folder of notebooks: {source}")
    return [source]


def read_notebook(path: Path):
    try:
        return nbformat.read(path, as_version=4)
    except Exception as err:           # nbformat raises several types for a damaged file
        raise ValueError(f"{path} is not a readable notebook: {err}") from None


def grade_cells(nb) -> dict:
    """grade_id -> cell, for every grade cell of nb."""
    return {cell.metadata.nbgrader["grade_id"]: cell for cell in nb.cells if is_grade(cell)}


def student_version(nb, name: str = "notebook"):
    """A copy of the instructor notebook nb with the solutions, hidden tests and outputs removed."""
    if not any(is_solution(cell) for cell in nb.cells):
        raise ValueError(f"{name} has no solution cells (nbgrader metadata 'solution': true): nothing to hand out")
    nb = copy.deepcopy(nb)
    resources = {}
    try:
        for step in (ClearSolutions(), ClearHiddenTests(), ClearOutputPreprocessor()):
            nb, resources = step.preprocess(nb, resources)
    except RuntimeError as err:        # nbgrader's word for bad markup (unclosed region, unmarked cell)
        raise ValueError(f"{name}: {err}") from None
    return nb


def release(notebooks, out, force: bool = False) -> list[Path]:
    """Write the student version of each instructor notebook (paths, see find_notebooks) into
    the folder `out`, under the same name.

    Nothing is written if a target exists (unless force) or any notebook fails: all are made
    first, then written as one group (io/files.written_together). Returns the written paths.
    """
    out = Path(out)
    made = {}
    for path in map(Path, notebooks):
        made[out / path.name] = student_version(read_notebook(path), path.name)
    existing = [str(p) for p in made if p.exists()]
    if existing and not force:
        raise FileExistsError(f"would overwrite {', '.join(existing)} (pass force to replace them)")
    out.mkdir(parents=True, exist_ok=True)
    with written_together(list(made), force=force) as partials:      # all notebooks or none, each complete
        for partial, nb in zip(partials, made.values()):
            nbformat.write(nb, partial)
    return list(made)


@dataclass(frozen=True)
class Score:
    """One grade cell's result: points earned of possible, and why nothing was earned."""
    grade_id: str
    earned: float
    possible: float
    reason: str = ""


def error_line(cell) -> str:
    """The exception of a cell's error output as one line, e.g. 'NotImplementedError: '."""
    for output in cell.outputs:
        if output.output_type == "error":
            return f"{output.ename}: {output.evalue}".splitlines()[0]
        if output.output_type == "stream" and output.name == "stderr":
            return "wrote to stderr: " + output.text.strip().splitlines()[0]
    return ""


def with_instructors_checks(submission, key: dict, name: str):
    """A copy of the submission, outputs cleared, whose grade cells are the instructor's (source
    and metadata, so points too); a cell the student marked as graded is not. key: grade_cells of
    the instructor's notebook."""
    nb = copy.deepcopy(submission)
    found = 0
    for cell in nb.cells:
        if is_grade(cell):
            theirs = key.get(cell.metadata.nbgrader["grade_id"])
            if theirs is None:
                cell.metadata.nbgrader["grade"] = False
            else:
                cell.source, cell.metadata = theirs.source, copy.deepcopy(theirs.metadata)
                found += 1
    if not found:
        raise ValueError(f"{name} has none of the assignment's grade cells: is it the right notebook?")
    nb, _ = ClearOutputPreprocessor().preprocess(nb, {})
    return nb


def run(nb, folder: Path, timeout: int):
    """Execute nb in a fresh kernel, in `folder`, keeping going past errors. Returns (index of
    the cell at which the run stopped, why) for a cell that timed out or a kernel that died,
    else (None, "")."""
    try:
        NotebookClient(nb, timeout=timeout, allow_errors=True, kernel_name="python3",
                       resources={"metadata": {"path": str(folder)}}).execute()
    except (CellTimeoutError, DeadKernelError) as err:
        started = [i for i, cell in enumerate(nb.cells) if cell.get("execution_count") is not None]
        why = "the kernel died" if isinstance(err, DeadKernelError) else f"a cell ran over {timeout} s"
        return (started[-1] if started else 0), why
    return None, ""


def grade(submission, instructor, timeout: int = 300) -> list[Score]:
    """Run a student's notebook with the instructor's grade cells and score each of them, in the
    instructor's order. A grade cell the student deleted, and one the run did not finish (a cell
    over `timeout` seconds, a dead kernel), scores 0.

    submission, instructor: paths of the two notebooks.
    """
    submission = Path(submission)
    key = grade_cells(read_notebook(Path(instructor)))
    nb = with_instructors_checks(read_notebook(submission), key, submission.name)
    stop, why = run(nb, submission.parent, timeout)
    where = {cell.metadata.nbgrader["grade_id"]: i for i, cell in enumerate(nb.cells) if is_grade(cell)}
    scores = []
    for grade_id, theirs in key.items():
        possible = float(theirs.metadata.nbgrader["points"])
        if grade_id not in where:
            scores.append(Score(grade_id, 0.0, possible, "grade cell deleted"))
        elif stop is not None and where[grade_id] >= stop:
            scores.append(Score(grade_id, 0.0, possible, f"not finished: {why}"))
        elif (cell := nb.cells[where[grade_id]]).cell_type != "code":
            scores.append(Score(grade_id, 0.0, possible, f"the grade cell was made a {cell.cell_type} cell"))
        else:
            earned, _ = determine_grade(cell)
            scores.append(Score(grade_id, earned, possible, "" if earned == possible else error_line(cell)))
    return scores
