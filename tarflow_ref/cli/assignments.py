"""`assignments release | grade`: the student versions of the course assignments (grading/course.py),
and the reports and class table of students' notebooks (grading/gradebook.py)."""
import os
from pathlib import Path

from .common import CommandError, Parser, count


def add(commands):
    p = commands.add_parser("assignments", help="hand out and grade the course assignments (assignments/)",
                            description="Student versions of the course assignments, and the grades of "
                                        "students' notebooks.")
    actions = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    source = Parser(add_help=False)
    source.add_argument("--source", type=Path, help="the instructor notebook(s): one .ipynb or a folder "
                        "(default: this repository's assignments/)")
    rel = actions.add_parser("release", parents=[source], help="write the student versions (solutions removed)")
    rel.add_argument("--out", type=Path, required=True, help="folder for the student notebooks")
    rel.add_argument("--force", action="store_true", help="replace student notebooks already in --out")
    gr = actions.add_parser("grade", parents=[source], help="grade students' notebooks: points per part and flags",
                            description="Runs each notebook in a contained kernel (its own user id, no network, "
                                        "limits) and its checks in the grader's process, and prints a report per "
                                        "submission; --out also writes them and the class table (grades.csv).")
    gr.add_argument("submissions", type=Path, nargs="+",
                    help="student notebooks named like the assignment's, or folders of them (one folder per student)")
    gr.add_argument("--timeout", type=count, default=300, help="seconds per cell and per check (default: 300)")
    gr.add_argument("--out", type=Path, help="folder for the reports (reports/) and the class table (grades.csv)")
    gr.add_argument("--force", action="store_true", help="replace reports and a table already in --out")
    gr.add_argument("--resume", action="store_true",
                    help="keep the reports in --out that are still valid, grade the rest")
    gr.add_argument("--jobs", type=count, default=os.cpu_count() or 1,
                    help="submissions graded at once (default: the number of cores)")
    gr.add_argument("--allow-reference", action="store_true",
                    help="flagged parts keep their points (the flags are still reported)")
    gr.add_argument("--unsafe", action="store_true", help="grade even where the kernel cannot get fewer rights than "
                    "the grader (not root): fit for grading your own notebook only")
    return {rel: run_release, gr: run_grade}


def instructor_notebooks(args) -> dict:
    """name -> path of the instructor notebooks in --source (default: the repository's assignments/)."""
    from ..grading.course import ASSIGNMENTS, find_notebooks

    source = args.source if args.source is not None else ASSIGNMENTS
    if args.source is None and not source.is_dir():
        raise CommandError(f"this installation has no assignments folder ({source}); pass --source")
    try:
        return {path.name: path for path in find_notebooks(source)}
    except ValueError as err:
        raise CommandError(str(err)) from None


def run_release(args):
    from ..grading.course import release

    sources = instructor_notebooks(args)
    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out {args.out}: is a file, not a folder")
    try:
        written = release(sources.values(), args.out, force=args.force)
    except (ValueError, FileExistsError) as err:
        raise CommandError(str(err)) from None
    for path in written:
        print(f"wrote {path}")


def run_grade(args):
    from ..grading.gradebook import grade_command

    sources = instructor_notebooks(args)
    try:
        grade_command(args.submissions, sources, args.out, jobs=args.jobs, force=args.force, resume=args.resume,
                      timeout=args.timeout, allow_reference=args.allow_reference, unsafe=args.unsafe)
    except (ValueError, FileExistsError) as err:
        raise CommandError(str(err)) from None
