"""How long grading a class takes: the six instructor notebooks of assignments/ as a class of six
submissions, graded by `tarflow_ref.grading.gradebook.grade_class` (contained kernels, checks in the
grader), once per --jobs value, side by side.

    .venv/bin/python benchmarks/grading.py                 # --jobs = the number of cores
    .venv/bin/python benchmarks/grading.py --jobs 1 2      # and the speed-up of 2 over 1

Prints, per run, the wall time to the class table and the CPU seconds of the graders and kernels
(each report's), per submission and in all, and the wall-time ratio of each run to the first.
Grading needs root for its containment (see assignments/README.md); --unsafe grades without it.
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from tarflow_ref.grading.course import ASSIGNMENTS, find_notebooks
from tarflow_ref.grading.gradebook import find_submissions, grade_class


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[os.cpu_count() or 1])
    parser.add_argument("--unsafe", action="store_true", help="grade without containment (not root)")
    args = parser.parse_args()
    notebooks = {p.name: p for p in find_notebooks(ASSIGNMENTS)}
    with tempfile.TemporaryDirectory() as folder:
        for path in notebooks.values():
            (Path(folder) / "class" / path.stem).mkdir(parents=True)
            shutil.copy(path, Path(folder) / "class" / path.stem)
        submissions = find_submissions([Path(folder) / "class"], notebooks)
        first = None
        for jobs in args.jobs:
            out = Path(folder) / f"out-{jobs}"
            started = time.monotonic()
            reports = grade_class(submissions, out, jobs=jobs, unsafe=args.unsafe)
            wall = time.monotonic() - started
            first = first or wall
            for s, r in zip(submissions, reports):
                cpu = "?" if r.cpu_seconds is None else f"{r.cpu_seconds:.1f}"
                print(f"  {s.name:<40} {r.earned:g}/{r.possible:g}  {r.seconds:5.1f} s  {cpu} s CPU")
            cpu = sum(r.cpu_seconds or 0 for r in reports)
            print(f"jobs {jobs}: the table of {len(reports)} in {wall:.1f} s, {cpu:.1f} s CPU in the graders and "
                  f"kernels; {first / wall:.2f}x the first run's speed")


if __name__ == "__main__":
    main()
