"""What a submission's own code touches, read from its cells' syntax trees (never run): the package's
code beyond what the assignment hands out, the grading machinery, and code the grader cannot read.

The student's code is every code cell of the submission except the grade cells (the instructor's
are put back) and the cells it left exactly as the instructor wrote them; in the cells it did write
or change, a line that is one of the instructor's given lines is the instructor's code too. Each finding is a Flag
on one line of one cell, and belongs to the part whose grade cell comes next (after the last grade
cell it belongs to none: no check runs after it). Three kinds:

    reference  the package's own code (tarflow_ref) other than what the assignment hands out: the
               names the instructor's code uses before the first part (e.g. toy_conditioner, TOY)
               or in the solutions (e.g. KVCache), the checks the grade cells call, and the seeded
               problems of grading/problems.py. Names
               bound to such code carry the flag on (an alias, a helper function that calls it).
    machinery  the grading and the kernel: rebinding a name the notebook imports from the package
               (`check_shift = ...`), assigning into a module (`np.exp = ...`,
               `grading.check_shift.__code__ = ...`), get_ipython (set_custom_exc), sys.modules,
               frames, __code__ / __globals__ / __closure__, setattr, importlib, inspect, gc, ctypes.
    opaque     code the grader cannot read: exec / eval / compile / __import__, getattr with a
               computed name, a shell command, a process, a module that is not installed.

A flagged part scores 0 unless the instructor passes --allow-reference; the flags are listed in the
report with their lines either way. The kernel's agent (remote.py) adds what it sees at run time.
"""
from __future__ import annotations

import ast
import importlib
import sys
import types
from dataclasses import dataclass

from nbgrader.utils import is_grade, is_solution

PACKAGE = "tarflow_ref"
PROBLEMS = f"{PACKAGE}.grading.problems:"
# importable modules a submission may use besides the standard library and the notebook's own
LIBRARIES = {"numpy", "scipy", "einops", "matplotlib", "torch", "math"}
MACHINERY_MODULES = {"builtins", "importlib", "inspect", "gc", "ctypes", "IPython", "ipykernel", "jupyter_client",
                     "jupyter_core", "nbclient", "nbformat", "nbgrader", "traitlets", "zmq", "marshal", "pickle",
                     "dill", "cloudpickle", "dis", "code", "codeop", "runpy", "imp", "pkgutil", "site", "sysconfig",
                     "types", "unittest", "pytest"}
PROCESS_MODULES = {"subprocess", "multiprocessing", "pty"}
MACHINERY_ATTRIBUTES = {"set_custom_exc", "CustomTB", "custom_exceptions", "showtraceback", "_showtraceback",
                        "run_cell", "user_ns", "user_global_ns", "kernel", "events", "__code__", "__globals__",
                        "__closure__", "__builtins__", "__subclasses__", "__wrapped__", "__defaults__",
                        "__kwdefaults__", "__dict__", "f_globals", "f_locals", "f_back", "f_builtins", "f_code",
                        "tb_frame", "gi_frame", "cr_frame", "_getframe", "settrace", "setprofile", "addaudithook",
                        "meta_path", "path_hooks"}
SYS_ATTRIBUTES = {"modules", "path"}
MACHINERY_NAMES = {"get_ipython": "uses get_ipython(), the kernel's shell", "globals": "uses globals()",
                   "vars": "uses vars()", "setattr": "uses setattr", "delattr": "uses delattr",
                   "__builtins__": "uses __builtins__"}
OPAQUE_NAMES = {"exec": "runs code from a string (exec)", "eval": "runs code from a string (eval)",
                "compile": "compiles code from a string", "__import__": "imports by __import__",
                "breakpoint": "calls breakpoint()"}
OPAQUE_CALLS = {("os", "system"), ("os", "popen"), ("os", "fork"), ("os", "execv"), ("os", "execve"),
                ("os", "execvp"), ("os", "spawnv"), ("os", "spawnl"), ("os", "posix_spawn"), ("os", "startfile")}
SAFE_MAGICS = {"time", "timeit", "matplotlib", "precision"}


@dataclass(frozen=True)
class Flag:
    """One finding: the part it belongs to (a grade_id, None after the last grade cell), its kind,
    where it is (e.g. 'cell 12, line 3'), the line itself, and what it does, in words."""
    part: str | None
    kind: str
    where: str
    line: str
    what: str

    def describe(self) -> str:
        line = f": {self.line}" if self.line else ""
        return f"[{self.kind}] {self.where}{line}  -- {self.what}"


def python_source(source: str) -> str:
    """A cell's source as Python (magics and shell escapes become get_ipython() calls, as IPython runs them)."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def imports_of(nb, cells=None) -> list[ast.stmt]:
    """The import statements at the top level of nb's code cells (all but the grade cells, or `cells`)."""
    found = []
    for cell in cells if cells is not None else [c for c in nb.cells if c.cell_type == "code" and not is_grade(c)]:
        try:
            tree = ast.parse(python_source(cell.source))
        except SyntaxError:
            continue
        found += [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    return found


def bound_names(node) -> dict:
    """name -> dotted path of what an import statement binds, e.g. {'flow': 'tarflow_ref.flow',
    'check_shift': 'tarflow_ref.grading.flow.check_shift', 'np': 'numpy'}."""
    if isinstance(node, ast.Import):
        return {a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0] for a in node.names}
    base = "." * node.level + (node.module or "")
    return {a.asname or a.name: f"{base}.{a.name}" for a in node.names if a.name != "*"}


def resolve(path: str):
    """The object at a dotted path (modules imported as needed), or None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception:
            continue
        for attribute in parts[i:]:
            if isinstance(obj, types.ModuleType) and not hasattr(obj, attribute):
                try:
                    obj = importlib.import_module(f"{obj.__name__}.{attribute}")
                    continue
                except Exception:
                    return None
            obj = getattr(obj, attribute, None)
            if obj is None:
                return None
        return obj
    return None


def qualified(obj) -> str | None:
    """'module:qualname' of the package's module, function or class obj (the qualname of an
    instance's class for an instance), or None for anything outside the package."""
    if isinstance(obj, types.ModuleType):
        return f"{obj.__name__}:" if obj.__name__.split(".")[0] == PACKAGE else None
    target = obj if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)) else type(obj)
    module = getattr(target, "__module__", None) or ""
    if module.split(".")[0] != PACKAGE:
        return None
    return f"{module}:{getattr(target, '__qualname__', getattr(target, '__name__', '?'))}"


def shown(name: str) -> str:
    """'tarflow_ref.flow:block_inverse' -> 'tarflow_ref.flow.block_inverse'."""
    return name.rstrip(":").replace(":", ".")


def chain(node) -> list[str] | None:
    """['flow', 'block_inverse'] for the expression flow.block_inverse, None unless names and attributes only."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + names[::-1]


class Assignment:
    """What the instructor's notebook hands out and imports: read once, used for every submission."""

    def __init__(self, key):
        code = [cell for cell in key.cells if cell.cell_type == "code"]
        self.given = {cell.source.strip() for cell in code if not is_grade(cell) and not is_solution(cell)}
        self.given_lines = {line.strip() for text in self.given for line in python_source(text).splitlines()}
        self.bindings = {}                 # name -> dotted path, from the notebook's own imports
        for node in imports_of(key):
            self.bindings.update(bound_names(node))
        self.objects = {name: resolve(path) for name, path in self.bindings.items()}
        self.tops = {path.split(".")[0] for path in self.bindings.values()} | LIBRARIES
        first_solution = next((i for i, cell in enumerate(code) if is_solution(cell)), len(code))
        handed_out = [cell for i, cell in enumerate(code)
                      if (i < first_solution and not is_grade(cell)) or is_solution(cell) or is_grade(cell)]
        self.allowed = set()
        for cell in handed_out:
            try:
                tree = ast.parse(python_source(cell.source))
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Name, ast.Attribute)) and isinstance(getattr(node, "ctx", None), ast.Load):
                    name = self.package_object(chain(node))
                    if name and not name.endswith(":"):
                        self.allowed.add(name)
        used = set()                       # the names the grade cells use
        for cell in code:
            if is_grade(cell):
                try:
                    used |= {n.id for n in ast.walk(ast.parse(python_source(cell.source))) if isinstance(n, ast.Name)}
                except SyntaxError:
                    pass
        self.grade_imports = [node for node in imports_of(key) if set(bound_names(node)) & used]

    def hands_out(self, where: str) -> bool:
        """Whether the assignment hands out the package object 'module:qualname' (all of problems.py,
        the seeded problems a student may pose to themselves, is)."""
        return where in self.allowed or where.startswith(PROBLEMS)

    def tracer_allowed(self) -> list[str]:
        """What the kernel's profile hook lets run (remote.Tracer): the handed-out names and problems.py."""
        return sorted(self.allowed) + [PROBLEMS]

    def package_object(self, names):
        """'module:qualname' of the package object an expression like flow.block_inverse names, or None."""
        if not names or names[0] not in self.objects:
            return None
        obj, found = self.objects[names[0]], qualified(self.objects[names[0]])
        for attribute in names[1:]:
            if not isinstance(obj, (types.ModuleType, type)):
                break
            obj = getattr(obj, attribute, None)
            if obj is None:
                break
            found = qualified(obj) or found
        return found

    def watch(self) -> dict:
        """What the kernel's agent should watch (remote.setup): the package's modules the notebook
        imports from, with the functions and classes defined in each, and the names bound to them."""
        modules, names = {}, {}
        for name in self.bindings:
            obj = self.objects.get(name)
            where = qualified(obj) if obj is not None else None
            if where is None:
                continue
            module = where.split(":")[0]
            modules.setdefault(module, None)
            if not where.endswith(":") and isinstance(obj, (type, types.FunctionType)):
                names[name] = [module, where.split(":")[1]]
        modules.setdefault(f"{PACKAGE}.grading.report", None)
        for module in modules:
            loaded = sys.modules.get(module) or resolve(module)
            modules[module] = sorted(a for a, o in vars(loaded).items() if isinstance(o, (type, types.FunctionType))
                                     and getattr(o, "__module__", "") == module)
        return {"modules": modules, "names": names}


class Scanner(ast.NodeVisitor):
    """Flags of one student cell; names it binds to flagged code stay flagged for later cells."""

    def __init__(self, assignment: Assignment, tainted: dict, modules: dict, lines: list[str]):
        self.a, self.tainted, self.modules, self.lines = assignment, tainted, modules, lines
        self.found = []                    # (line number, kind, what)

    def flag(self, node, kind, what) -> bool:
        """Record a finding, unless its line is one of the instructor's given code (a student may
        copy or keep those); True when recorded."""
        lineno = getattr(node, "lineno", 1)
        if 0 < lineno <= len(self.lines) and self.lines[lineno - 1].strip() in self.a.given_lines:
            return False
        self.found.append((lineno, kind, what))
        return True

    # --- imports ---
    def visit_Import(self, node):
        self.check_import(node, [a.name for a in node.names])

    def visit_ImportFrom(self, node):
        self.check_import(node, [node.module or ""])

    def check_import(self, node, modules):
        for name, path in bound_names(node).items():
            if self.a.bindings.get(name, path) != path:
                self.check_rebinding(node, name)
            top = path.split(".")[0]
            if top == PACKAGE:
                obj = resolve(path)
                where = qualified(obj) if obj is not None else None
                if where is None or not self.a.hands_out(where):
                    kind = "machinery" if path.startswith(f"{PACKAGE}.grading") else "reference"
                    what = f"imports {path}" + (", the package's own code" if kind == "reference" else
                                                ", the grading machinery")
                    if self.flag(node, kind, what):
                        self.tainted[name] = (kind, f"{name} is {path}")
            elif top in MACHINERY_MODULES:
                self.flag(node, "machinery", f"imports {path}")
            elif top in PROCESS_MODULES:
                self.flag(node, "opaque", f"imports {path}: other processes run code the grader cannot read")
            elif top not in self.a.tops and top not in sys.stdlib_module_names:
                self.flag(node, "opaque", f"imports {path}, which the grader cannot read")
            self.modules[name] = path

    # --- names and attributes ---
    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load):
            self.check_load(node, [node.id])
        else:
            self.check_rebinding(node, node.id)

    def visit_Attribute(self, node):
        names = chain(node)
        if isinstance(node.ctx, ast.Load) and names:
            self.check_load(node, names)
        for attribute in names[1:] if names else [node.attr]:      # each of a.b.c: its parts are not visited
            if attribute in MACHINERY_ATTRIBUTES:
                self.flag(node, "machinery", f"uses .{attribute}")
        if names and len(names) > 1 and self.modules.get(names[0]) == "sys" and names[1] in SYS_ATTRIBUTES:
            self.flag(node, "machinery", f"uses sys.{names[1]}")
        if not isinstance(node.ctx, ast.Load):
            root = names[0] if names else None
            if root and (root in self.modules or root in self.a.bindings):
                self.flag(node, "machinery", f"assigns into {'.'.join(names)} (monkeypatching)")
        if names is None:
            self.generic_visit(node)

    def check_load(self, node, names):
        if names[0] in self.tainted:
            kind, why = self.tainted[names[0]]
            self.flag(node, kind, f"uses {names[0]} ({why})")
            return
        where = self.a.package_object(names)
        if where is not None and not self.a.hands_out(where):
            self.flag(node, "reference", f"uses {shown(where)}, the package's own code")
        if len(names) == 1 and names[0] in MACHINERY_NAMES:
            self.flag(node, "machinery", MACHINERY_NAMES[names[0]])
        if len(names) == 1 and names[0] in OPAQUE_NAMES:
            self.flag(node, "opaque", OPAQUE_NAMES[names[0]])
        if len(names) == 2 and (self.modules.get(names[0]), names[1]) in OPAQUE_CALLS:
            self.flag(node, "opaque", f"runs another program ({'.'.join(names)})")

    def check_rebinding(self, node, name):
        if name in self.a.bindings and self.a.bindings[name].split(".")[0] == PACKAGE:
            self.flag(node, "machinery", f"rebinds {name}, which the notebook imports from {self.a.bindings[name]}")

    # --- statements that bind names ---
    def visit_FunctionDef(self, node):
        self.check_rebinding(node, node.name)
        before = len(self.found)
        self.generic_visit(node)
        flagged = self.found[before:]
        if flagged:
            self.tainted[node.name] = (flagged[0][1], f"a function using flagged code, line {flagged[0][0]}")

    visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

    def visit_Global(self, node):
        for name in node.names:
            self.check_rebinding(node, name)

    visit_Nonlocal = visit_Global

    def visit_Assign(self, node):
        before = len(self.found)
        self.generic_visit(node)
        flagged = self.found[before:]
        if flagged:
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in (n.id for n in ast.walk(target) if isinstance(n, ast.Name)):
                    self.tainted[name] = (flagged[0][1], f"bound to flagged code, line {flagged[0][0]}")

    visit_AnnAssign = visit_AugAssign = visit_NamedExpr = visit_Assign

    def visit_Call(self, node):
        names = chain(node.func)
        if names in (["getattr"], ["hasattr"]) and not (len(node.args) > 1 and isinstance(node.args[1], ast.Constant)):
            self.flag(node, "opaque", f"{names[0]} with a computed attribute name")
        elif names in (["getattr"], ["hasattr"]) and isinstance(node.args[1].value, str):
            attribute = ast.Attribute(value=node.args[0], attr=node.args[1].value, ctx=ast.Load(), lineno=node.lineno)
            self.visit_Attribute(attribute)
        magic = self.magic(node)
        if magic is not None:
            name, code = magic
            if name in ("system", "getoutput"):
                self.flag(node, "opaque", "runs a shell command")
            elif name not in SAFE_MAGICS:
                self.flag(node, "machinery", f"runs the magic %{name}")
            for text in code:
                self.scan_text(node, text)
            for arg in node.args[2:]:
                self.visit(arg)
            return
        self.generic_visit(node)

    def magic(self, node):
        """(name, code strings) of a get_ipython().run_line_magic / run_cell_magic / system call."""
        func = node.func
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call)
                and chain(func.value.func) == ["get_ipython"]):
            return None
        if func.attr in ("system", "getoutput"):
            return func.attr, []
        if func.attr in ("run_line_magic", "run_cell_magic") and node.args and isinstance(node.args[0], ast.Constant):
            name = str(node.args[0].value)
            texts = [a.value for a in node.args[1:] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            return name, texts if name in ("time", "timeit") else []
        return None

    def scan_text(self, node, text):
        try:
            tree = ast.parse(python_source(text))
        except SyntaxError:
            return
        for child in tree.body:
            ast.increment_lineno(child, node.lineno - 1)
            self.visit(child)

    def visit_Expr(self, node):
        if not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):  # docstrings: nothing
            self.generic_visit(node)

    def visit_Constant(self, node):
        if isinstance(node.value, str) and PACKAGE in node.value:
            self.flag(node, "reference", f"names the package in a string ({node.value[:40]!r})")


def scan(nb, assignment: Assignment) -> list[Flag]:
    """The flags of the student's code in nb (the notebook as it will run: the instructor's grade
    cells already put back), in cell order."""
    flags, tainted, modules = [], {}, dict(assignment.bindings)
    part_of, part = {}, None
    for index in reversed(range(len(nb.cells))):            # each cell belongs to the next grade cell
        cell = nb.cells[index]
        if is_grade(cell) and cell.cell_type == "code":
            part = cell.metadata.nbgrader["grade_id"]
        part_of[index] = part
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or is_grade(cell) or cell.source.strip() in assignment.given:
            continue
        try:
            tree = ast.parse(python_source(cell.source))
        except SyntaxError:
            continue                       # it fails in the kernel as well, and defines nothing
        lines = python_source(cell.source).splitlines()
        scanner = Scanner(assignment, tainted, modules, lines)
        scanner.visit(tree)
        original = cell.source.splitlines()
        if len(original) == len(lines):    # show the line as written (`!ls`, not get_ipython().system)
            lines = original
        seen = set()
        for lineno, kind, what in scanner.found:
            if (lineno, what) in seen:
                continue
            seen.add((lineno, what))
            text = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
            flags.append(Flag(part_of[index], kind, f"cell {index + 1}, line {lineno}", text[:120], what))
    return flags
