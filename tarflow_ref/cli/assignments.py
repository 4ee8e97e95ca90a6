"""`assignments release | grade`: the student versions of the course assignments, and the points of
a student's notebook (grading/course.py)."""
from pathlib import Path

from .common import CommandError, Parser, count


def add(commands):
    p = commands.add_parser("assignments", help="hand out and grade the course assignments (assignments/)",
                            description="Student versions of the course assignments, and the points of a "
                                        "student's notebook.")
    actions = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    source = Parser(add_help=False)
    source.add_argument("--source", type=Path, help="the instructor notebook(s): one .ipynb or a folder "
                        "(default: this repository's assignments/)")
    rel = actions.add_parser("release", parents=[source], help="write the student versions (solutions removed)")
    rel.add_argument("--out", type=Path, required=True, help="folder for the student notebooks")
    rel.add_argument("--force", action="store_true", help="replace student notebooks already in --out")
    gr = actions.add_parser("grade", parents=[source], help="run students' notebooks and print their points",
                            description="Runs each notebook with the instructor's grade cells (it executes the "
                                        "student's code: use a sandbox) and prints a table of points.")
    gr.add_argument("submissions", type=Path, nargs="+", help="student notebooks, named like the assignment's")
    gr.add_argument("--timeout", type=count, default=300, help="seconds per cell (default: 300)")
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
    from ..grading.course import grade

    sources = instructor_notebooks(args)
    for path in args.submissions:
        if not path.is_file():
            raise CommandError(f"{path}: no such notebook")
        if path.name not in sources:
            raise CommandError(f"{path}: no assignment named {path.name} (there are: {', '.join(sources)})")
    for path in args.submissions:
        try:
            scores = grade(path, sources[path.name], timeout=args.timeout)
        except ValueError as err:
            raise CommandError(str(err)) from None
        print(f"{path}: {sum(s.earned for s in scores):g} / {sum(s.possible for s in scores):g} points")
        for s in scores:
            print(f"  {s.grade_id:<24} {s.earned:g} / {s.possible:g}" + (f"   {s.reason}" if s.reason else ""))
