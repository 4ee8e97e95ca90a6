"""A student's code cannot reach outside its kernel (tarflow_ref/grading/sandbox.py): run as root, as
CI does, the kernel runs as a user id of its own, in namespaces where there are, with limits, and
everything it started dies with it.

The hostile submission tries each thing in its own cell and keeps what happened; the instructor's
grade cells (run in the grader) ask for it, so a point means "tried, and refused". Then the test
looks outside: the file is still there, the repository is unchanged, no connection arrived, no
process is left.
"""
import os
import resource
import socket
import uuid
from pathlib import Path

import nbformat
import pytest

from tarflow_ref.cli import main
from tarflow_ref.grading import sandbox
from tarflow_ref.grading.course import Uncontained, grade

REPOSITORY = Path(__file__).resolve().parents[1]
PLANTED = REPOSITORY / "planted-by-a-student.txt"

HOSTILE = '''import os, resource, socket, subprocess, sys
### BEGIN SOLUTION
tried = {}

def attempt(name, action):
    try:
        action()
        tried[name] = "done"
    except Exception as err:
        tried[name] = type(err).__name__

attempt("delete", lambda: os.remove(VICTIM))
attempt("delete-visible", lambda: os.remove(VISIBLE_VICTIM))
attempt("repository", lambda: open(PLANTED, "w").write("x"))
attempt("socket", lambda: socket.create_connection(("127.0.0.1", PORT), timeout=5).close())
attempt("memory", lambda: bytearray(12 << 30))
attempt("files", lambda: [open(os.devnull) for _ in range(2000)])
background = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", MARKER], start_new_session=True)
daemon = "import os, time\\nif os.fork(): os._exit(0)\\nos.setsid()\\ntime.sleep(600)"
subprocess.run([sys.executable, "-c", daemon, MARKER])
limits = {name: resource.getrlimit(getattr(resource, name))[0]
          for name in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_FSIZE")}

def outcome(name):
    if name == "background":
        return "running" if background.poll() is None else "stopped"
    return limits[name] if name in limits else tried[name]
### END SOLUTION
'''
CHECKS = {
    "check_delete": 'assert outcome("delete") != "done"',
    "check_delete_visible": 'assert outcome("delete-visible") == "PermissionError"',  # seen, and refused
    "check_repository": 'assert outcome("repository") != "done"',
    "check_socket": 'assert outcome("socket") != "done"',
    "check_memory": 'assert outcome("memory") == "MemoryError"',
    "check_files": 'assert outcome("files") == "OSError"',
    "check_background": 'assert outcome("background") == "running"',
    "check_limits": "assert (outcome('RLIMIT_CPU'), outcome('RLIMIT_AS'), outcome('RLIMIT_NPROC'), "
                    "outcome('RLIMIT_NOFILE'), outcome('RLIMIT_FSIZE')) == ({cpu}, {memory}, {processes}, {files}, "
                    "{file_bytes})",
}


def meta(grade_id, points=None):
    m = {"grade_id": grade_id, "schema_version": 3, "solution": points is None, "task": False,
         "grade": points is not None, "locked": points is not None}
    if points is not None:
        m["points"] = points
    return {"nbgrader": m}


def hostile(path: Path, victim: Path, visible_victim: Path, port: int, marker: str) -> Path:
    """The hostile notebook (instructor's and student's at once: its solution is the attack)."""
    limits = sandbox.Limits()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    setup = (f"VICTIM, VISIBLE_VICTIM, PLANTED, PORT, MARKER = {str(victim)!r}, {str(visible_victim)!r}, "
             f"{str(PLANTED)!r}, {port}, {marker!r}")
    nb.cells = [nbformat.v4.new_code_cell(setup), nbformat.v4.new_code_cell(HOSTILE, metadata=meta("attack"))]
    nb.cells += [nbformat.v4.new_code_cell(source.format(cpu=limits.cpu_seconds, memory=limits.memory_bytes,
                                                         processes=limits.processes, files=limits.open_files,
                                                         file_bytes=limits.file_bytes), metadata=meta(grade_id, 1))
                 for grade_id, source in CHECKS.items()]
    nbformat.write(nb, path)
    return path


def marked_processes(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="containment needs root (CI runs as root)")


@needs_root
@pytest.mark.parametrize("namespaces", [True, False], ids=["own-user-and-namespaces", "own-user-only"])
def test_the_kernel_cannot_reach_outside(tmp_path, monkeypatch, namespaces):
    if namespaces and not sandbox.probe().namespaces:
        pytest.skip("this machine has no namespaces (unshare)")
    if not namespaces and sandbox.closed_folder(sandbox.python_paths()):
        pytest.skip("other users cannot run this Python without a mount namespace (e.g. it lives under /root)")
    monkeypatch.setattr(sandbox, "probe", lambda: sandbox.Containment(True, namespaces))
    victims = tmp_path / "victims"                          # readable by all, writable by root only
    victims.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    victim = victims / "victim.txt"                         # in /tmp, which the kernel gets a private one of
    # in the package's folder, which the kernel sees wherever the checkout is (under /tmp too)
    visible_victim = Path(sandbox.__file__).resolve().parents[1] / f".victim-{uuid.uuid4().hex}.txt"
    for path in (victim, visible_victim):
        path.write_text("keep me")
        path.chmod(0o644)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    marker = f"tarflow-sandbox-test-{uuid.uuid4().hex}"
    (tmp_path / "hw").mkdir()
    notebook = hostile(tmp_path / "hw" / "hw.ipynb", victim, visible_victim, listener.getsockname()[1], marker)
    try:
        report = grade(notebook, notebook, timeout=120, allow_reference=True)     # it is flagged, rightly
        kept = visible_victim.exists() and visible_victim.read_text() == "keep me"
    finally:
        planted = PLANTED.exists()
        PLANTED.unlink(missing_ok=True)
        visible_victim.unlink(missing_ok=True)
    earned = {s.grade_id: (s.earned, s.reason) for s in report.scores}
    expect_socket_refused = namespaces                      # without a network namespace 127.0.0.1 is reachable
    for grade_id in CHECKS:
        if grade_id != "check_socket" or expect_socket_refused:
            assert earned[grade_id][0] == 1, (grade_id, report.text())
    assert victim.read_text() == "keep me" and kept and not planted
    assert any("subprocess" in flag.what for flag in report.flags)
    with pytest.raises(BlockingIOError):
        listener.accept()
    if namespaces:
        assert report.containment == "own user id, network, PID and mount namespaces"
    assert not marked_processes(marker)                     # the background process and the daemon are gone
    listener.close()


def test_without_rights_to_drop_grading_stops_unless_unsafe(tmp_path, monkeypatch, capsys):
    """Not root: one line says so, and nothing runs; --unsafe grades with the grader's own rights."""
    why = "cannot drop rights: not running as root"
    monkeypatch.setattr(sandbox, "probe", lambda: sandbox.Containment(False, False, why))
    (tmp_path / "src").mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.cells = [nbformat.v4.new_code_cell("### BEGIN SOLUTION\ndef twice(x):\n    return 2 * x\n### END SOLUTION",
                                          metadata=meta("twice")),
                nbformat.v4.new_code_cell("assert twice(21) == 42", metadata=meta("check_twice", 1))]
    key = tmp_path / "src" / "hw.ipynb"
    nbformat.write(nb, key)
    with pytest.raises(Uncontained, match=why):
        grade(key, key)
    with pytest.raises(SystemExit) as stop:
        main(["assignments", "grade", "--source", str(key.parent), str(key)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and why in err and "--unsafe" in err and len(err.strip().splitlines()) == 1
    main(["assignments", "grade", "--source", str(key.parent), str(key), "--unsafe"])
    captured = capsys.readouterr()
    assert "hw.ipynb: 1 / 1 points" in captured.out and "UNSAFE" in captured.err


@needs_root
def test_a_fresh_user_id_owns_nothing_and_leaves_nothing():
    uid = sandbox.fresh_uid()
    assert uid >= sandbox.FIRST_UID and not sandbox.user_processes(uid)
    pid = os.fork()
    if pid == 0:                                            # a process of that user, as a kernel would leave
        try:
            os.setgid(uid)
            os.setuid(uid)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            os.execv("/bin/sleep", ["sleep", "600"])
        finally:
            os._exit(1)
    try:
        for _ in range(200):
            if sandbox.user_processes(uid):
                break
            os.sched_yield()
        assert sandbox.user_processes(uid) == [pid]
        assert sandbox.kill_user(uid) and not sandbox.user_processes(uid)
    finally:
        os.waitpid(pid, 0)


@needs_root
def test_python_under_tmp_stays_visible_to_the_kernel(tmp_path, monkeypatch):
    """The kernel's private /tmp keeps what its Python imports from /tmp (a clone or a virtual
    environment there, as a CI job may have): here a PYTHONPATH folder under pytest's tmp_path."""
    import tempfile

    from tarflow_ref.grading.kernel import StudentKernel

    assert str(tmp_path).startswith(tuple(f"{folder}/" for folder in sandbox.PRIVATE_TMP))
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "beside_the_checkout.py").write_text("VALUE = 41\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(modules), os.environ.get("PYTHONPATH")])))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import beside_the_checkout\n\ndef value():\n"
                                          "    return beside_the_checkout.VALUE + 1")]
    with tempfile.TemporaryDirectory() as work:
        with StudentKernel(nb, Path(work), sandbox.probe(), sandbox.fresh_uid(), sandbox.Limits(), 120) as running:
            running.run_cell(nb.cells[0], 0)
            running.setup({"modules": {}, "names": {}}, [])
            assert running.function("value")() == 42
