"""Containment of a student's kernel: an unprivileged user of its own, private namespaces, limits,
a scratch folder, and every process it started killed at the end.

A student's notebook is untrusted code. As root (a grading server, CI) each submission's kernel
runs as a fresh numeric user id that owns nothing but its scratch folder, so it cannot delete or
change a file outside it, nor signal or read another submission's kernel. Where the system has
namespaces (`unshare`), the kernel also gets

    a network namespace    no interface but a loopback that is down: no connection leaves it (the
                           grader talks to the kernel over Unix sockets in the work folder, ZMQ's
                           ipc transport, which crosses network namespaces)
    a PID namespace        the launcher below is its process 1: when the kernel is shut down, the
                           kernel's processes die with it, double-forked daemons included
    a mount namespace      empty private /tmp, /var/tmp and /dev/shm, and the folders the grader
                           names hidden behind empty ones (the instructor's notebooks, the other
                           submissions, the reports)

and the limits of `Limits` (CPU seconds, address space, processes, open files, file size). At the
end every process of that user id is killed (kill_user), whether or not namespaces held them.

Without root nothing can drop rights: `probe` says so in one line and grading proceeds only when
the instructor passes --unsafe (the kernel then runs as the grader's own user, with the limits and
the scratch folder but no other protection: fit for grading one's own notebook only).

The launcher (`python sandbox.py launch ...`, process 1 of the namespaces, still root) is this
file run as a script, so it imports the standard library only.
"""
from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# user ids far above any account's and below 2^31 (some tools read ids as signed 32-bit numbers)
FIRST_UID, UID_RANGE = 1_900_000_000, 100_000_000
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm")


@dataclass(frozen=True)
class Limits:
    """Resource limits of a student's kernel (setrlimit, per process; processes per user id)."""
    cpu_seconds: int = 1200
    memory_bytes: int = 6 << 30          # address space: torch maps ~2 GB that it never touches
    processes: int = 256                 # tasks of the user id, threads included (BLAS, ZMQ, IPython)
    open_files: int = 512
    file_bytes: int = 256 << 20
    tmp_bytes: int = 256 << 20           # each private /tmp, /var/tmp and /dev/shm


LIMITS = Limits()                        # the default of grading a submission


@dataclass(frozen=True)
class Containment:
    """How a kernel can be contained on this machine: as its own user (root) with or without
    namespaces, or not at all (unsafe)."""
    own_user: bool
    namespaces: bool
    why_not: str = ""                    # one line when own_user is False

    def describe(self) -> str:
        if not self.own_user:
            return f"UNSAFE: the kernel runs as the grader's own user ({self.why_not})"
        return "own user id" + (", network, PID and mount namespaces" if self.namespaces
                                else "; no namespaces (the network is reachable)")


@cache
def probe() -> Containment:
    """What this machine allows: root to run kernels as other user ids, and unshare for namespaces."""
    if os.geteuid() != 0:
        return Containment(False, False, "cannot drop rights: not running as root")
    unshare = shutil.which("unshare")
    test = subprocess.run([unshare, "--net", "--pid", "--fork", "--kill-child", "--mount", "--propagation",
                           "private", "--mount-proc", "true"], capture_output=True) if unshare else None
    if test is not None and test.returncode == 0:
        return Containment(True, True)
    closed = closed_folder(python_paths())
    if closed:                             # without a mount namespace nothing can open it
        return Containment(False, False, f"cannot drop rights: other users cannot enter {closed}, which holds "
                                         "the kernel's Python, and there are no namespaces (unshare) to open it")
    return Containment(True, False)


def closed_folder(paths) -> str | None:
    """The first folder on the way to one of paths that other users may not pass through, or None."""
    for path in paths:
        parts = os.path.abspath(path).split("/")
        for i in range(2, len(parts) + 1):
            folder = "/".join(parts[:i])
            if os.path.isdir(folder) and not os.stat(folder).st_mode & 0o001:
                return folder
    return None


def fresh_uid() -> int:
    """A user id no account and no running process has."""
    while True:
        uid = FIRST_UID + random.randrange(UID_RANGE)
        if not user_processes(uid):
            try:
                import pwd
                pwd.getpwuid(uid)
            except KeyError:
                return uid


def user_processes(uid: int) -> list[int]:
    """PIDs of the live processes (zombies aside) whose real or effective user id is uid."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        if str(uid) in fields.get("Uid", "").split()[:2] and not fields.get("State", "").strip().startswith("Z"):
            found.append(int(entry.name))
    return found


def user_cpu_seconds(uid: int) -> float:
    """CPU seconds used so far by the live processes of uid and the children they reaped."""
    total = 0
    for pid in user_processes(uid):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])     # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def kill_user(uid: int, attempts: int = 50) -> bool:
    """SIGKILL every process of uid until none is left; True when none is."""
    for _ in range(attempts):
        pids = user_processes(uid)
        if not pids:
            return True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    return not user_processes(uid)


def kill_group(group: int):
    """SIGKILL the process group (the unsafe mode's only handle on what the kernel started)."""
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def prepare(work: Path, uid: int | None) -> tuple[Path, Path]:
    """(scratch, run): the kernel's working folder and the folder of its sockets and connection
    file, inside work, owned by uid (None: by the grader's user, unsafe mode)."""
    scratch, run = work / "scratch", work / "run"
    for folder in (scratch, run, scratch / ".home"):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if uid is not None:
            os.chown(folder, uid, uid)
    work.chmod(0o711)                      # the kernel may pass through, not list
    return scratch, run


def kernel_prefix(containment: Containment, uid: int | None, work: Path, connection_file: Path,
                  limits: Limits, hide=()) -> list[str]:
    """The command that wraps the kernel's: unshare (namespaces, when there are) and the launcher."""
    launcher = [sys.executable, "-I", os.path.abspath(__file__), "launch", "--work", str(work),
                "--connection", str(connection_file), "--limits", ",".join(str(v) for v in limits.__dict__.values())]
    if uid is not None:
        launcher += ["--uid", str(uid)]
    if containment.namespaces:
        launcher += ["--private-mounts"] + [f"--hide={Path(h).resolve()}" for h in hide] + \
            [f"--reach={p}" for p in python_paths()]
        return [shutil.which("unshare"), "--net", "--pid", "--fork", "--kill-child", "--mount", "--propagation",
                "private", "--mount-proc"] + launcher + ["--"]
    return launcher + ["--"]


def python_paths() -> list[str]:
    """The folders the kernel's Python needs to read: the interpreter, its installation, the
    environment's packages, PYTHONPATH and this package (outside the environment when installed
    in editable mode)."""
    paths = {os.path.realpath(sys.executable), sys.prefix, sys.base_prefix, os.path.realpath(sys.base_prefix),
             str(Path(__file__).resolve().parents[1])}
    paths.update(os.path.realpath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    return sorted(p for p in paths if os.path.exists(p))


def kernel_environment(scratch: Path) -> dict:
    """The kernel's environment: no variable of the grader's but the ones Python needs, one BLAS
    thread (submissions are graded in parallel), and a home inside the scratch folder."""
    env = {key: os.environ[key] for key in ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "VIRTUAL_ENV") if key in os.environ}
    home = scratch / ".home"
    env.update(HOME=str(home), IPYTHONDIR=str(home / ".ipython"), MPLCONFIGDIR=str(home / ".matplotlib"),
               TMPDIR=str(scratch), MPLBACKEND="agg", PYTHONDONTWRITEBYTECODE="1",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


# ---- the launcher: process 1 of the namespaces -------------------------------------------------------

@cache
def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None):
    import ctypes

    if _libc().mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


MS_BIND, MS_REC = 4096, 16384


def replace_folder(folder: str, keep: list[str], mode: str):
    """Mount an empty tmpfs over folder, then bind the paths `keep` (inside it) back where they were."""
    fds = {path: os.open(path, os.O_PATH) for path in keep if os.path.exists(path)}
    _mount("tmpfs", folder, "tmpfs", 0, mode)
    for path, fd in fds.items():
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
        os.close(fd)


def private_mounts(work: str, hide: list[str], reach: list[str], tmp_bytes: int):
    """Empty private /tmp, /var/tmp, /dev/shm and `hide` folders, work kept where it is; and every
    folder on the way to the paths `reach` (the Python installation) that others may not pass
    through (e.g. /root, mode 700, holding pyenv) replaced by one that shows those paths only."""
    for folder in PRIVATE_TMP:             # a checkout or environment under /tmp stays where it is
        if os.path.isdir(folder):
            replace_folder(folder, [p for p in [work, *reach] if p.startswith(folder + "/")],
                           f"size={tmp_bytes},mode=1777")
    for folder in hide:                    # never one the kernel needs: its work folder or Python
        inside = folder.rstrip("/") + "/"
        if os.path.isdir(folder) and not any((p + "/").startswith(inside) for p in [work, *reach]):
            replace_folder(folder, [], "size=4096,mode=0555")
    for _ in range(16):                    # one closed folder per round, outermost first
        folder = closed_folder(reach)
        if folder is None:
            return
        keep = {"/".join(os.path.abspath(p).split("/")[:folder.count("/") + 2]) for p in reach
                if os.path.abspath(p).startswith(folder + "/")}
        replace_folder(folder, sorted(keep), "size=4096,mode=0755")


def drop_rights(uid: int):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    _libc().prctl(38, 1, 0, 0, 0)          # PR_SET_NO_NEW_PRIVS: no setuid program gives root back


def set_limits(limits: Limits):
    for kind, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_bytes),
                        (resource.RLIMIT_NPROC, limits.processes), (resource.RLIMIT_NOFILE, limits.open_files),
                        (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(kind, (value, value))


def launch(argv: list[str]):
    """launch --work W --connection C --limits a,b,... [--uid U] [--private-mounts] [--hide=D ...] -- cmd..."""
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
    value = {key: options[i + 1] for i, key in enumerate(options)
             if key in ("--work", "--connection", "--limits", "--uid")}
    hide = [o.split("=", 1)[1] for o in options if o.startswith("--hide=")]
    reach = [o.split("=", 1)[1] for o in options if o.startswith("--reach=")]
    limits = Limits(*(int(v) for v in value["--limits"].split(",")))
    uid = int(value["--uid"]) if "--uid" in value else None
    if "--private-mounts" in options:
        private_mounts(value["--work"], hide, reach, limits.tmp_bytes)
    if uid is not None:
        os.chown(value["--connection"], uid, uid)
    _libc()                                # loaded while the installation is still readable
    child = os.fork()
    if child == 0:
        try:
            set_limits(limits)
            if uid is not None:
                drop_rights(uid)
            os.chdir(os.path.join(value["--work"], "scratch"))
            _libc().prctl(1, signal.SIGKILL, 0, 0, 0)       # PR_SET_PDEATHSIG: die with the launcher
            # ipykernel would watch for its parent's PID, which this launcher has replaced
            env = {key: value for key, value in os.environ.items() if key != "JPY_PARENT_PID"}
            os.execve(command[0], command, env)
        except BaseException as err:
            print(f"sandbox: cannot start the kernel: {err}", file=sys.stderr, flush=True)
        finally:
            os._exit(127)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: os.kill(child, signum))
    while True:                            # reap orphans until the kernel itself exits
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        if pid == child:
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__" and sys.argv[1:2] == ["launch"]:
    launch(sys.argv[2:])
