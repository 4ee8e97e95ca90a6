"""The grader's agent inside a student's kernel: it calls the student's functions on the inputs the
grader sends and sends back what they return, as plain data (wire.py). Nothing here decides a grade.

The grader (kernel.py) runs `serve()` in the kernel with stdin allowed; every exchange is an input
request of the kernel whose prompt is a JSON message, answered by the grader's input reply:

    kernel: {"op": "ready"}                        grader: a request, e.g.
        {"op": "call", "name": "flow_inverse", "calls": [{"args": [z, f], "kwargs": {}}, ...]}
    kernel: {"op": "callback", "id": 1, "call": {"args": [u], "kwargs": {}}}
                                                   grader: {"ok": true, "value": (a, m)}, or an error
    kernel: {"op": "done", "results": [...], "called": [...], "state": [...]}    grader: ""

A callback is a function the grader passed (a conditioner f, a score): the student's code calls a
stub here, and the grader runs the real one in its own process, so its weights never enter the
kernel. `called` lists the package's functions (outside grading/ and the names the assignment
hands out) that ran while the student's function did, seen by a profile hook; `state` lists
tampering with the grading machinery seen in the kernel (a custom exception handler, a check or a
module replaced or its __code__ rewritten). Both only ever add flags: a student who blinds this
agent gains nothing it could not gain by lying in its results, and what the results are worth
is decided by the checks in the grader's process.
"""
import json
import os
import sys

import numpy as np

from . import wire

# a builtin exception named by the grader is raised as itself in the student's code, others as RuntimeError
EXCEPTIONS = {e.__name__: e for e in (ValueError, TypeError, IndexError, KeyError, RuntimeError, ZeroDivisionError,
                                      FloatingPointError, OverflowError, ArithmeticError, LookupError,
                                      AssertionError, NotImplementedError, AttributeError)}
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
GRADING = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _kernel_raw_input():
    """The kernel's input request, or None outside a kernel."""
    from IPython import get_ipython

    shell = get_ipython()
    return getattr(getattr(shell, "kernel", None), "raw_input", None)


# taken when the grader imports this module, before any cell of the student's runs
_raw_input = _kernel_raw_input()
_setprofile, _getprofile = sys.setprofile, sys.getprofile
_watch = {"modules": {}, "names": {}, "allowed": ()}
_MISSING = object()


def _ask(message: dict) -> str:
    return _raw_input(json.dumps(message))


def serve():
    """Answer one request of the grader (see the module docstring)."""
    request = json.loads(_ask({"op": "ready"}))
    op = request.get("op")
    if op == "setup":
        setup(request.get("watch", {}), request.get("allowed", []))
        _ask({"op": "done"})
    elif op == "call":
        results, called = [], []
        for call in request["calls"]:
            results.append(_call(request["name"], wire.unpack(call, _stub), called))
        _ask({"op": "done", "results": results, "called": called, "state": state()})
    elif op == "state":
        _ask({"op": "done", "state": state()})


def _stub(handle: int, name: str):
    """A function that asks the grader to run its callable number `handle` on plain data."""
    def call(*args, **kwargs):
        tracer = _getprofile()             # the exchange with the grader is not the student's code
        _setprofile(None)
        try:
            reply = json.loads(_ask({"op": "callback", "id": handle, "call": wire.pack({"args": list(args),
                                                                                           "kwargs": kwargs})}))
        finally:
            _setprofile(tracer)
        if reply.get("ok"):
            return wire.unpack(reply.get("value"), _stub)
        error = reply.get("error", {})
        kind = EXCEPTIONS.get(error.get("type"))
        raise kind(error.get("message", "")) if kind else RuntimeError(f"{error.get('type')}: {error.get('message')}")
    call.__name__ = call.__qualname__ = name
    return call


def _call(name: str, call: dict, called: list) -> dict:
    """Call the student's function `name` of the notebook's namespace; its result, or the exception it
    raised, and the array arguments it changed in place (so that the grader's check sees it)."""
    fn = sys.modules["__main__"].__dict__.get(name, _MISSING)
    if fn is _MISSING:
        return {"ok": False, "error": {"type": "NameError", "message": f"name '{name}' is not defined"}, "changed": {}}
    args, kwargs = call.get("args", []), call.get("kwargs", {})
    given = {**dict(enumerate(args)), **kwargs}
    before = {key: value.copy() for key, value in given.items() if isinstance(value, np.ndarray)}
    tracer = Tracer(_watch["allowed"], called)
    previous = _getprofile()
    try:
        _setprofile(tracer)
        try:
            value = fn(*args, **kwargs)
        finally:
            _setprofile(previous)
        result = {"ok": True, "value": wire.pack(value)}
    except BaseException as err:                       # the student's error, whatever it is, is their answer
        result = {"ok": False, "error": {"type": type(err).__name__, "message": str(err)[:2000]}}
    changed = {}
    for key, old in before.items():
        new = given[key]
        if new.shape != old.shape or not _equal(new, old):
            changed[str(key)] = wire.pack(new)
    result["changed"] = changed
    return result


def _equal(a, b) -> bool:
    try:
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    except TypeError:
        return bool(np.array_equal(a, b))


class Tracer:
    """A profile hook that records the package's functions the student's code calls, other than
    `allowed`: (file, qualname prefix) pairs whose code, and all it calls, is handed out by the
    assignment (e.g. KVCache; an empty prefix: the whole file). What a recorded function calls in
    turn is not recorded."""

    def __init__(self, allowed, called: list):
        self.allowed, self.called, self.kinds, self.inside = allowed, called, {}, []

    def kind(self, code):
        found = self.kinds.get(code)
        if found is None:
            path, qualname = code.co_filename, getattr(code, "co_qualname", code.co_name)
            if not path.startswith(PACKAGE):
                found = "other"
            elif any(path == file and (not prefix or qualname == prefix or qualname.startswith(prefix + "."))
                     for file, prefix in self.allowed):
                found = "allowed"
            else:
                found = "other" if path.startswith(GRADING) else "reference"
            self.kinds[code] = found
        return found

    def __call__(self, frame, event, arg):
        if event == "call":
            if self.inside:
                return
            kind = self.kind(frame.f_code)
            if kind == "reference":                # the entry into the package is what the student called
                module = frame.f_code.co_filename[len(PACKAGE):-3].replace(os.sep, ".")
                name = f"tarflow_ref.{module}.{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}"
                if name not in self.called:
                    self.called.append(name)
            if kind in ("allowed", "reference"):   # and nothing that runs inside it
                self.inside.append(frame)
        elif event == "return" and self.inside and frame is self.inside[-1]:
            self.inside.pop()


def setup(watch: dict, allowed: list):
    """Remember the modules and names the notebook's own cells import from the package, before any
    student code runs: watch = {"modules": {module: [attribute, ...]}, "names": {name: [module,
    attribute]}} (integrity.Assignment.watch); allowed: 'module:qualname' names whose code the
    tracer lets run (see Tracer)."""
    import importlib

    names = watch.get("names", {})
    for module_name, attributes in watch.get("modules", {}).items():
        module = importlib.import_module(module_name)
        objects = {a: getattr(module, a) for a in attributes if hasattr(module, a)}
        _watch["modules"][module_name] = (module, {a: (o, getattr(o, "__code__", None)) for a, o in objects.items()})
    for name, (module_name, attribute) in names.items():
        _watch["names"][name] = _watch["modules"][module_name][1].get(attribute, (None, None))[0]
    pairs = []
    for qualified in allowed:
        module_name, _, qualname = qualified.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        pairs.append((os.path.abspath(module.__file__), qualname))
    _watch["allowed"] = tuple(pairs)


def state() -> list:
    """What the student's cells did to the grading machinery, in words (empty when nothing)."""
    seen = []
    try:
        from IPython import get_ipython

        if get_ipython().custom_exceptions:
            seen.append("set_custom_exc installed an exception handler")
    except Exception:
        seen.append("the IPython shell was tampered with")
    for module_name, (module, objects) in _watch["modules"].items():
        if sys.modules.get(module_name) is not module:
            seen.append(f"sys.modules['{module_name}'] was replaced")
        for attribute, (obj, code) in objects.items():
            now = getattr(module, attribute, None)
            if now is not obj:
                seen.append(f"{module_name}.{attribute} was replaced")
            elif code is not None and getattr(obj, "__code__", None) is not code:
                seen.append(f"{module_name}.{attribute}.__code__ was rewritten")
    namespace = sys.modules["__main__"].__dict__
    for name, obj in _watch["names"].items():
        if name in namespace and namespace[name] is not obj:
            seen.append(f"the notebook's name {name} was rebound")
    return seen
