"""Hand out and grade the course assignments (assignments/), in nbgrader's markup.

An assignment notebook is the instructor's version. nbgrader's cell metadata marks its
solution cells (the student's part lies between `### BEGIN SOLUTION` and `### END SOLUTION`) and
its grade cells (locked, worth `points`, calling the checks of tarflow_ref.grading).

    release:  instructor notebook -> student notebook. Each solution region becomes
              `# YOUR CODE HERE` + `raise NotImplementedError()` (nbgrader's ClearSolutions),
              regions between `### BEGIN HIDDEN TESTS` and `### END HIDDEN TESTS` go
              (ClearHiddenTests), and the outputs are cleared.
    grade:    student notebook -> a Report (points per part, flags, time). Every grade cell is put
              back as the instructor wrote it (source and points), so editing, deleting or adding a
              check earns nothing. The notebook runs top to bottom in a fresh, contained kernel
              (sandbox.py: its own user id, no network, limits, a scratch copy), except its grade
              cells: each runs HERE, in the grader's process, with the instructor's imports, and
              every other name it uses (the student's functions) is a proxy that calls the
              student's function in the kernel on the inputs the check chooses and returns plain
              data (kernel.py). A part earns its points when its grade cell runs without an error
              (nbgrader's rule, now applied to the out-of-process check), and nothing when the run
              stopped before it (a cell or check over the time limit, a dead kernel), or when the
              student's code for it is flagged (integrity.py, and what the kernel's agent saw) and
              the instructor did not pass allow_reference. Nothing the kernel prints counts.

The markup is nbgrader's own, so an instructor running the full nbgrader (gradebook, feedback)
uses the same notebooks with `nbgrader generate_assignment` / `autograde` (which, unlike grade,
trusts the student's kernel).
"""
from __future__ import annotations

import ast
import builtins
import copy
import io
import shutil
import tempfile
import time
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import nbformat
from nbconvert.preprocessors import ClearOutputPreprocessor
from nbgrader.preprocessors import ClearHiddenTests, ClearSolutions
from nbgrader.utils import is_grade, is_solution

from ..io.files import written_together
from . import sandbox
from .integrity import Assignment, Flag, scan
from .kernel import KernelStopped, StudentError, StudentKernel

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
    """One part's result: points earned of possible, and why not all were earned."""
    grade_id: str
    earned: float
    possible: float
    reason: str = ""


@dataclass
class Report:
    """The grade of one submission: points per part, flags, and how it ran."""
    submission: str
    assignment: str
    scores: list[Score]
    flags: list[Flag] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float | None = None     # the grader's and the kernel's (None: the kernel's is unknown)
    containment: str = ""
    allow_reference: bool = False

    @property
    def earned(self) -> float:
        return sum(s.earned for s in self.scores)

    @property
    def possible(self) -> float:
        return sum(s.possible for s in self.scores)

    def text(self) -> str:
        """The report as the CLI prints it."""
        cpu = "" if self.cpu_seconds is None else f", {self.cpu_seconds:.1f} s CPU"
        lines = [f"{self.submission}: {self.earned:g} / {self.possible:g} points ({self.seconds:.1f} s{cpu})"]
        lines += [f"  {s.grade_id:<34} {s.earned:g} / {s.possible:g}" + (f"   {s.reason}" if s.reason else "")
                  for s in self.scores]
        if self.flags:
            note = "shown only: --allow-reference" if self.allow_reference else "each scores its part 0"
            lines.append(f"  flags ({note}):")
            lines += [f"    {flag.part or 'after the last part'}: {flag.describe()}" for flag in self.flags]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        return cls(**{**data, "scores": [Score(**s) for s in data["scores"]],
                      "flags": [Flag(**f) for f in data["flags"]]})


class Uncontained(RuntimeError):
    """This machine cannot run a kernel with fewer rights than the grader's, and unsafe was not given."""


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


@lru_cache(maxsize=16)
def assignment_of(instructor: Path, modified: float):
    """(instructor notebook, Assignment, namespace of its imports for the grade cells), read once."""
    key = read_notebook(instructor)
    assignment = Assignment(key)
    namespace = {}
    exec(compile(ast.Module(body=assignment.grade_imports, type_ignores=[]), str(instructor), "exec"), namespace)
    return key, assignment, namespace


def student_names(source: str, namespace: dict) -> list[str]:
    """The names a grade cell uses that neither it, the instructor's imports nor Python binds: the
    student's functions."""
    tree = ast.parse(source)
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return sorted(used - bound - set(namespace) - set(dir(builtins)))


def run_check(source: str, namespace: dict, kernel: StudentKernel) -> str:
    """Run a grade cell in this process, the student's functions proxied to the kernel: '' when it
    passes, else the error as one line. KernelStopped when the kernel stopped."""
    env = dict(namespace)
    env.update({name: kernel.function(name) for name in student_names(source, namespace)})
    try:
        with redirect_stdout(io.StringIO()):
            exec(compile(source, "<grade cell>", "exec"), env)
    except KernelStopped:
        raise
    except StudentError as err:
        return str(err).splitlines()[0] if str(err).strip() else err.kind
    except Exception as err:
        text = f"{type(err).__name__}: {err}"
        return text.splitlines()[0] if text.strip() else type(err).__name__
    return ""


def grade(submission, instructor, timeout: int = 300, allow_reference: bool = False, unsafe: bool = False,
          hide=(), limits: sandbox.Limits = sandbox.LIMITS) -> Report:
    """Grade a student's notebook against the instructor's (paths): run it contained, run its grade
    cells here against the kernel, scan its code, and score each part in the instructor's order.

    A grade cell the student deleted or made a markdown cell scores 0, and so does one the run did
    not reach (a cell or check over `timeout` seconds, a dead kernel) and, unless allow_reference,
    one whose part is flagged. hide: folders the kernel must not see (other submissions, the
    instructor's notebooks, which are hidden always). Uncontained when this machine cannot drop
    rights and unsafe is False.
    """
    started, cpu_started = time.monotonic(), time.process_time()
    containment = sandbox.probe()
    if not containment.own_user and not unsafe:
        raise Uncontained(f"{containment.why_not}; --unsafe grades anyway, with the grader's own rights "
                          "(only for your own notebook)")
    submission, instructor = Path(submission), Path(instructor)
    key, assignment, namespace = assignment_of(instructor.resolve(), instructor.stat().st_mtime)
    nb = with_instructors_checks(read_notebook(submission), grade_cells(key), submission.name)
    flags = scan(nb, assignment)
    outcome, stopped, dynamic, kernel_cpu = run_contained(nb, submission, assignment, namespace, containment, timeout,
                                                          limits, [instructor.parent, *hide])
    flags += dynamic
    where = {cell.metadata.nbgrader["grade_id"]: cell for cell in nb.cells if is_grade(cell)}
    flagged = {flag.part for flag in flags}
    scores = []
    for grade_id, theirs in grade_cells(key).items():
        possible = float(theirs.metadata.nbgrader["points"])
        if grade_id not in where:
            scores.append(Score(grade_id, 0.0, possible, "grade cell deleted"))
        elif where[grade_id].cell_type != "code":
            scores.append(Score(grade_id, 0.0, possible, f"the grade cell was made a {where[grade_id].cell_type} cell"))
        elif grade_id not in outcome:
            scores.append(Score(grade_id, 0.0, possible, f"not finished: {stopped}"))
        elif grade_id in flagged and not allow_reference:
            would = "would earn nothing" if outcome[grade_id] else f"would earn {possible:g}"
            scores.append(Score(grade_id, 0.0, possible, f"flagged ({would}; see the flags)"))
        else:
            reason = outcome[grade_id]
            scores.append(Score(grade_id, 0.0 if reason else possible, possible, reason))
    cpu = None if kernel_cpu is None else kernel_cpu + time.process_time() - cpu_started
    return Report(str(submission), instructor.name, scores, flags, time.monotonic() - started, cpu,
                  containment.describe(), allow_reference)


def run_contained(nb, submission: Path, assignment: Assignment, namespace: dict, containment, timeout, limits, hide):
    """Run nb in a contained kernel, its grade cells here: ({grade_id: reason, '' when passed} for
    the grade cells reached, why the run stopped ('' if it did not), dynamic flags, the kernel's CPU
    seconds or None)."""
    work = Path(tempfile.mkdtemp(prefix="tarflow-grade-"))
    uid = sandbox.fresh_uid() if containment.own_user else None
    outcome, stopped, dynamic, seen, kernel = {}, "", [], set(), None
    try:
        with StudentKernel(nb, work, containment, uid, limits, timeout, hide) as kernel:
            shutil.copy(submission, kernel.scratch / submission.name)
            if uid is not None:
                (kernel.scratch / submission.name).chmod(0o600)
                shutil.chown(kernel.scratch / submission.name, uid, uid)
            kernel.setup(assignment.watch(), assignment.tracer_allowed())
            last = max((i for i, cell in enumerate(nb.cells) if is_grade(cell) and cell.cell_type == "code"),
                       default=-1)
            for index, cell in enumerate(nb.cells[:last + 1]):      # no cell after the last check counts
                if cell.cell_type != "code":
                    continue
                if not is_grade(cell):
                    kernel.run_cell(cell, index)
                    continue
                grade_id = cell.metadata.nbgrader["grade_id"]
                try:
                    kernel.dynamic += kernel.state()
                except StudentError:
                    kernel.dynamic.append("the grader's agent in the kernel was replaced or broken")
                outcome[grade_id] = run_check(cell.source, namespace, kernel)
                for what in kernel.dynamic:
                    if what not in seen:
                        seen.add(what)
                        kind = "reference" if what.startswith("called ") else "machinery"
                        dynamic.append(Flag(grade_id, kind, f"in the kernel, by {grade_id}", "", what))
                kernel.dynamic = []
    except KernelStopped as err:
        stopped = str(err)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return outcome, stopped, dynamic, getattr(kernel, "cpu_seconds", None)
