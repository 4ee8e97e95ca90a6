"""Grade a class: every submission in a folder, in parallel, into one report per submission and a
table (CSV) of the class.

    submissions/alice/02_affine_flow.ipynb   ->  out/reports/alice/02_affine_flow.ipynb.json
    submissions/bob/02_affine_flow.ipynb         out/reports/bob/02_affine_flow.ipynb.json
    ...                                          out/grades.csv

A submission is a notebook named like one of the assignment's notebooks, anywhere below the folder
(.ipynb_checkpoints aside); its student is the first folder of its path below the submissions
folder. Up to `jobs` submissions are graded at once (one grader process and one contained kernel
each). A report is written as soon as its submission is graded, so an interrupted run resumes
where it stopped (resume=True): a report is reused when the submission, the instructor's notebook
and the options are the ones it was made from. Every file is written whole or not at all (a
temporary file renamed into place), and nothing already there is overwritten without force.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from . import sandbox
from .course import Report, grade

TABLE = "grades.csv"


@dataclass(frozen=True)
class Submission:
    """One notebook to grade: its path, the name it is reported under, and the instructor's notebook."""
    path: Path
    name: str
    instructor: Path

    @property
    def student(self) -> str:
        parts = Path(self.name).parts
        return parts[0] if len(parts) > 1 else ""


def find_submissions(paths, instructors: dict) -> list[Submission]:
    """The notebooks among paths (files, or folders searched below), named like the instructor
    notebooks in instructors (name -> path). ValueError names a file that is no assignment or a
    folder without any."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            if path.name not in instructors:
                raise ValueError(f"{path}: no assignment named {path.name} (there are: {', '.join(instructors)})")
            found.append(Submission(path, str(path), instructors[path.name]))
        elif path.is_dir():
            inside = sorted(p for p in path.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
                            and p.name in instructors and p.is_file())
            if not inside:
                raise ValueError(f"{path}: no notebook named like an assignment ({', '.join(instructors)}) in it")
            found += [Submission(p, str(p.relative_to(path)), instructors[p.name]) for p in inside]
        else:
            raise ValueError(f"{path}: no such notebook or folder")
    names = [s.name for s in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two submissions would share the report name {twice[0]}: grade them in separate runs")
    return found


def fingerprint(submission: Submission, options: dict) -> str:
    """What a report was made from: the submission's and the instructor's bytes, and the options."""
    digest = hashlib.sha256()
    for path in (submission.path, submission.instructor):
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()


def write_atomically(path: Path, text: str):
    """Write text to path whole or not at all (a temporary file in the same folder, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", newline="") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def report_path(out: Path, submission: Submission) -> Path:
    return out / "reports" / f"{submission.name}.json"


def check_outputs(out: Path, submissions, force: bool, resume: bool):
    """FileExistsError, before any work, if the table or a report is there and neither force nor resume."""
    if force or resume:
        return
    there = [p for p in [out / TABLE, *(report_path(out, s) for s in submissions)] if p.exists()]
    if there:
        raise FileExistsError(f"would overwrite {there[0]}" + (f" and {len(there) - 1} more" if len(there) > 1 else "")
                              + " (pass --force to replace, --resume to continue)")


def grade_one(submission: Submission, options: dict, hide) -> dict:
    """Grade one submission (in a worker process); the report as a dict, or the error it raised."""
    try:
        report = grade(submission.path, submission.instructor, hide=hide, **options)
    except Exception as err:               # a notebook that cannot be graded is a row that says why
        return {"error": f"{type(err).__name__}: {err}"}
    report.submission = submission.name
    return report.to_dict()


def grade_class(submissions, out: Path | None = None, jobs: int = 1, force: bool = False, resume: bool = False,
                progress=None, hide=(), **options) -> list:
    """Grade every submission (find_submissions), up to jobs at a time: a Report, or the error a
    submission could not be graded for (a str), per submission in order. With out, write each
    report and the table into it (see the module docstring); options go to course.grade."""
    results, todo = {}, []
    if out is not None:
        check_outputs(out, submissions, force, resume)
    for s in submissions:
        kept = report_path(out, s) if out is not None and resume else None
        if kept is not None and kept.exists():
            saved = json.loads(kept.read_text())
            if saved.get("fingerprint") == fingerprint(s, options):
                results[s] = Report.from_dict(saved["report"])
                continue
        todo.append(s)
    hide = [*hide, *(out for out in [out] if out is not None)]

    def done(s: Submission, result: dict):
        if "error" in result:
            results[s] = result["error"]
        else:
            results[s] = Report.from_dict(result)
            if out is not None:
                saved = {"fingerprint": fingerprint(s, options), "report": result}
                write_atomically(report_path(out, s), json.dumps(saved, indent=1))
        if progress:
            progress(s, results[s])

    if jobs <= 1 or len(todo) <= 1:
        for s in todo:
            done(s, grade_one(s, options, hide))
    else:
        import multiprocessing

        # fork: a worker starts with the package imported (spawning one re-imports torch, seconds each)
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("fork"),
                                 initializer=_one_thread) as pool:
            running = {pool.submit(grade_one, s, options, hide): s for s in todo}
            for future in as_completed(running):
                done(running[future], future.result())
    ordered = [results[s] for s in submissions]
    if out is not None:
        write_atomically(out / TABLE, table(submissions, ordered))
    return ordered


def grade_command(paths, instructors: dict, out: Path | None = None, jobs: int = 1, force: bool = False,
                  resume: bool = False, timeout: int = 300, allow_reference: bool = False, unsafe: bool = False):
    """The CLI's `assignments grade`: check everything first (ValueError or FileExistsError, one line,
    before any work), then grade the submissions among paths (find_submissions) against the
    instructor notebooks (name -> path), print each report as it is done, and with out write them
    and the table."""
    if timeout < 1:
        raise ValueError(f"--timeout must be at least 1, got {timeout}")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if force and resume:
        raise ValueError("--force and --resume contradict each other: pass one")
    if (force or resume) and out is None:
        raise ValueError("--force and --resume need --out")
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    submissions = find_submissions(paths, instructors)
    if out is not None:
        check_outputs(out, submissions, force, resume)
    containment = sandbox.probe()
    if not containment.own_user:
        if not unsafe:
            raise ValueError(f"{containment.why_not}: the students' code would run with your rights "
                             "(--unsafe grades anyway: only for your own notebook)")
        print(f"warning: {containment.describe()}", file=sys.stderr)

    def show(submission, result):
        print(result.text() if isinstance(result, Report) else f"{submission.name}: not graded: {result}", flush=True)

    grade_class(submissions, out, jobs=jobs, force=force, resume=resume, progress=show,
                hide=[Path(p) if Path(p).is_dir() else Path(p).parent for p in paths], timeout=timeout,
                allow_reference=allow_reference, unsafe=unsafe)
    if out is not None:
        print(f"wrote {out / TABLE} and {len(submissions)} report(s) in {out / 'reports'}")


def _one_thread():
    """Each worker's checks in one thread: the workers share the machine's cores."""
    import torch

    torch.set_num_threads(1)


def table(submissions, results) -> str:
    """The class table as CSV: one row per submission, one column per part (in the assignments'
    order), points, flags, seconds and why a submission could not be graded."""
    parts = []
    for result in results:
        if isinstance(result, Report):
            parts += [s.grade_id for s in result.scores if s.grade_id not in parts]
    text = io.StringIO()
    rows = csv.writer(text)
    rows.writerow(["student", "submission", "assignment", "points", "possible", *parts, "flagged_parts", "flags",
                   "seconds", "cpu_seconds", "not_graded"])
    for s, result in zip(submissions, results):
        if isinstance(result, str):
            rows.writerow([s.student, s.name, s.instructor.name, "", "", *[""] * len(parts), "", "", "", "", result])
            continue
        earned = {score.grade_id: f"{score.earned:g}" for score in result.scores}
        flagged = sorted({flag.part for flag in result.flags if flag.part})
        rows.writerow([s.student, s.name, result.assignment, f"{result.earned:g}", f"{result.possible:g}",
                       *[earned.get(p, "") for p in parts], " ".join(flagged), len(result.flags),
                       f"{result.seconds:.1f}", "" if result.cpu_seconds is None else f"{result.cpu_seconds:.1f}", ""])
    return text.getvalue()
