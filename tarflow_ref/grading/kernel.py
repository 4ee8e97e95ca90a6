"""The grader's side of a student's kernel: start it contained (sandbox.py), run the notebook's cells in
it, and call the student's functions in it from checks that run here, in the grader's process.

    with StudentKernel(work, containment, uid, limits, timeout) as kernel:
        kernel.run_cell(cell, index)                 # a cell of the notebook, as nbclient runs it
        shift = kernel.function("shift")             # a proxy: shift(o) runs the student's shift in
        check_shift(shift)                           #   the kernel on o, and returns plain data

A proxy call is one request over the kernel's stdin channel (remote.py has the protocol); the
callables among its arguments (a conditioner f, a score) stay here and the kernel calls them back,
and proxy.batch(calls) sends many calls in one request. What comes back is untrusted data: decoded
by wire.py (no pickle), each message at most MAX_MESSAGE bytes, each request within the deadline
of the check that sent it; what the kernel prints is not even kept.
"""
from __future__ import annotations

import json
import time

import zmq
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from . import sandbox, wire

MAX_MESSAGE = 16 << 20   # the largest plain data a check exchanges is ~0.3 MB (360 digits' z)
STARTUP = 300             # seconds for the agent's setup (imports), before any of the student's code
SERVE = '__import__("tarflow_ref.grading.remote", fromlist=["serve"]).serve()'


class KernelStopped(Exception):
    """The kernel ran over the time limit or died: the rest of the notebook is not graded."""


class StudentError(Exception):
    """What the student's function raised in the kernel, by name and message."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


class ContainedKernelManager(AsyncKernelManager):
    """A kernel manager whose kernel starts behind sandbox.kernel_prefix, over ipc sockets."""
    prefix: list = []

    def format_kernel_cmd(self, extra_arguments=None):
        return self.prefix + super().format_kernel_cmd(extra_arguments)


class OutputlessClient(NotebookClient):
    """nbclient, keeping none of the kernel's output: none of it counts, and a student's cell that
    prints without end must not fill the grader's memory."""

    def output(self, outs, msg, display_id, cell_index):
        return None

    def handle_comm_msg(self, outs, msg, cell_index):
        return None


class KernelFunction:
    """A student's function `name` in the kernel, called from the grader: plain data in and out."""

    def __init__(self, kernel: StudentKernel, name: str):
        self.kernel, self.name, self.__name__ = kernel, name, name

    def __call__(self, *args, **kwargs):
        outcome = self.batch([(args, kwargs)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def batch(self, calls) -> list:
        """[(args, kwargs), ...] -> [value or StudentError, ...], in one round trip. Arrays among the
        arguments that the student's function changed in place are changed here too (as a call in
        the same process would), so that report.call_unchanged sees it."""
        calls = list(calls)
        results = self.kernel.call(self.name, calls)
        outcomes = []
        for (args, kwargs), result in zip(calls, results):
            for key, packed in result.get("changed", {}).items():
                target = args[int(key)] if key.isdigit() and int(key) < len(args) else kwargs.get(key)
                try:
                    target[...] = wire.unpack(packed)
                except Exception:
                    pass
            if result.get("ok"):
                outcomes.append(wire.unpack(result.get("value")))
            else:
                error = result.get("error") or {}
                outcomes.append(StudentError(str(error.get("type", "Error"))[:80], str(error.get("message", ""))))
        return outcomes


class StudentKernel:
    """A contained kernel running one student's notebook, and the grader's channel to it."""

    def __init__(self, nb, work, containment: sandbox.Containment, uid, limits: sandbox.Limits, timeout: int,
                 hide=()):
        self.work, self.uid, self.timeout = work, uid, timeout
        self.scratch, run = sandbox.prepare(work, uid)
        self.km = ContainedKernelManager(kernel_name="python3", transport="ipc", ip=str(run / "kernel"),
                                         connection_file=str(run / "kernel.json"))
        self.km.prefix = sandbox.kernel_prefix(containment, uid, work, run / "kernel.json", limits, hide)
        self.client = OutputlessClient(nb, km=self.km, timeout=timeout, allow_errors=True, kernel_name="python3",
                                     shutdown_kernel="immediate", resources={"metadata": {"path": str(self.scratch)}})
        self.callables, self.dynamic, self.cpu_seconds = {}, [], None

    def __enter__(self):
        self.log = open(self.work / "kernel.log", "wb")
        self._setup = self.client.setup_kernel(env=sandbox.kernel_environment(self.scratch), cleanup_kc=True,
                                               stdout=self.log, stderr=self.log)
        try:
            self._setup.__enter__()
        except RuntimeError as err:            # the kernel did not start: say why, from its own words
            self.log.flush()
            said = (self.work / "kernel.log").read_text(errors="replace").strip().splitlines()
            raise RuntimeError(f"{err}: {said[-1] if said else 'it wrote nothing'}") from None
        self.group = self.km.provisioner.pgid  # the launcher's process group, for the unsafe mode's cleanup
        self.kc = self.km.blocking_client()
        self.kc.start_channels(shell=True, iopub=False, stdin=True, hb=False, control=False)
        for channel in (self.kc.shell_channel, self.kc.stdin_channel):
            channel.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        return self

    def __exit__(self, *exc):
        if self.uid is not None:
            self.cpu_seconds = sandbox.user_cpu_seconds(self.uid)
        try:
            self.kc.stop_channels()
        finally:
            try:
                self._setup.__exit__(*exc)
            finally:
                self.log.close()
                if self.uid is not None:
                    sandbox.kill_user(self.uid)
                elif self.group:
                    sandbox.kill_group(self.group)

    def run_cell(self, cell, index: int):
        """Execute one cell of the notebook; KernelStopped if it ran over the time limit or the kernel died."""
        from nbclient.exceptions import CellTimeoutError, DeadKernelError

        try:
            self.client.execute_cell(cell, index)
        except CellTimeoutError:
            raise KernelStopped(f"a cell ran over {self.timeout} s") from None
        except DeadKernelError:
            raise KernelStopped("the kernel died") from None

    def function(self, name: str) -> KernelFunction:
        return KernelFunction(self, name)

    def setup(self, watch: dict, allowed: list):
        """Let the kernel's agent remember the grading machinery before any student cell runs."""
        self.request({"op": "setup", "watch": watch, "allowed": allowed}, max(self.timeout, STARTUP))

    def state(self) -> list:
        """Tampering with the grading machinery seen in the kernel so far, in words."""
        return self.request({"op": "state"}).get("state", [])

    def call(self, name: str, calls) -> list:
        """The results of calling the kernel's `name` on each (args, kwargs), in one request."""
        def callable_id(fn):
            self.callables[len(self.callables)] = fn
            return len(self.callables) - 1
        packed = [wire.pack({"args": list(args), "kwargs": dict(kwargs)}, callable_id) for args, kwargs in calls]
        try:
            done = self.request({"op": "call", "name": name, "calls": packed})
        finally:
            self.callables.clear()
        self.dynamic += [f"called {called}" for called in done.get("called", [])] + list(done.get("state", []))
        results = done.get("results")
        if not isinstance(results, list) or len(results) != len(packed) or \
                not all(isinstance(r, dict) for r in results):
            raise StudentError("GradingError", "the kernel sent no result for the call (was the grader's agent "
                                               "in the kernel replaced?)")
        return results

    def request(self, message: dict, seconds: float | None = None) -> dict:
        """Send message to the kernel's agent (remote.serve) and answer its callbacks until it is done,
        within `seconds` (default: the time limit of a check)."""
        seconds = self.timeout if seconds is None else seconds
        deadline = time.monotonic() + seconds
        msg_id = self.kc.execute(SERVE, silent=True, store_history=False, allow_stdin=True)
        poller = zmq.Poller()
        for channel in (self.kc.stdin_channel, self.kc.shell_channel):
            poller.register(channel.socket, zmq.POLLIN)
        done = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KernelStopped(f"a check ran over {seconds:g} s")
            if self.km.provisioner is None or self.km.provisioner.process.poll() is not None:
                raise KernelStopped("the kernel died")
            ready = dict(poller.poll(min(left, 1.0) * 1000))
            if self.kc.stdin_channel.socket in ready:
                msg = self.kc.stdin_channel.get_msg(timeout=0)
                if msg["parent_header"].get("msg_id") != msg_id or msg["msg_type"] != "input_request":
                    continue
                answer, finished = self.answer(msg["content"].get("prompt", ""), message)
                if finished is not None:
                    done = finished
                self.kc.input(answer)
            if self.kc.shell_channel.socket in ready:
                msg = self.kc.shell_channel.get_msg(timeout=0)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if done is None:
                    content = msg["content"]
                    raise StudentError(content.get("ename", "GradingError"),
                                       f"{content.get('evalue', '')} (the grader's agent in the kernel failed)")
                return done

    def answer(self, prompt: str, message: dict):
        """(reply, done message or None) for one input request of the kernel."""
        try:
            asked = json.loads(prompt)
            op = asked.get("op")
        except (ValueError, AttributeError, RecursionError):
            return "", None                # the student's own input(): no answer here
        if op == "ready":
            return json.dumps(message), None
        if op == "done":
            return "", asked
        if op == "callback":
            return json.dumps(self.callback(asked)), None
        return "", None

    def callback(self, asked: dict) -> dict:
        """Run a callable of the grader's (a conditioner, a score) on the plain data the kernel sent."""
        fn = self.callables.get(asked.get("id"))
        try:
            call = wire.unpack(asked.get("call"))
            if fn is None or not isinstance(call, dict) or not isinstance(call.get("args"), list) \
                    or not isinstance(call.get("kwargs"), dict) or not all(isinstance(k, str) for k in call["kwargs"]):
                raise TypeError("a malformed call")
            return {"ok": True, "value": wire.pack(fn(*call["args"], **call["kwargs"]))}
        except Exception as err:
            return {"ok": False, "error": {"type": type(err).__name__, "message": str(err)[:2000]}}
