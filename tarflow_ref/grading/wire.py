"""Plain data across the boundary between the grader and a student's kernel: JSON, never pickle.

Both sides use this codec: the grader (course.py, kernel.py) to send a check's inputs and to read
what the student's function returned, the student's kernel (remote.py) to read those inputs and
send its results. What the kernel sends is untrusted: decoding it builds nothing but the values
below, NumPy arrays are read by np.load(allow_pickle=False) and must hold numbers, and anything
else a student's function returns arrives as an `Unsendable` named after its type, which the
checks then refuse like any other wrong type ("expected an array, got generator").

    value                        on the wire (JSON)
    None, bool, int, float, str  itself (NaN and inf as Python's json writes them)
    list                         a JSON list
    tuple                        {"~": "tuple", "v": [...]}
    dict                         {"~": "dict", "v": [[key, value], ...]}
    ndarray (bool, int, float,   {"~": "array", "npy": base64 of np.save(allow_pickle=False)}
      complex), NumPy scalar     {"~": "scalar", "npy": ...} (a 0-d array, read back as a scalar)
    np.random.Generator          {"~": "rng", "bit_generator": "PCG64", "state": {...}}: a copy in
                                 the same state (the caller's generator does not advance)
    a dataclass of tarflow_ref   {"~": "dataclass", "type": "tarflow_ref.guidance:Guidance", "fields": {...}}
      (Guidance, TarFlowConfig)
    a callable (grader -> kernel {"~": "callable", "id": n, "name": "f"}: the kernel gets a stub that
      only)                      asks the grader to call it (remote.py), so its code and data
                                 (a conditioner's weights) never enter the student's kernel
    anything else (kernel ->     {"~": "object", "type": "generator"}
      grader)
"""
from __future__ import annotations

import base64
import dataclasses
import importlib
import io
import re

import numpy as np

# numbers only: np.load refuses object arrays already, and strings or records are no answer here
ARRAY_KINDS = "biufc"
BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
MAX_DEPTH = 32


class WireError(ValueError):
    """A message that does not decode (malformed, too deep, a dtype that is not a number)."""


class Unsendable:
    """Stands for a value the kernel could not send as plain data; the subclass carries its type's name."""

    def __repr__(self):
        return f"<{type(self).__name__} object that is not plain data>"


def unsendable(type_name: str) -> Unsendable:
    """An Unsendable whose type is named type_name (cleaned to an identifier): as_array's message
    then names the student's type, e.g. 'expected an array, got generator'."""
    name = re.sub(r"\W", "_", str(type_name))[:64] or "object"
    if not name[0].isalpha():
        name = "_" + name
    return type(name, (Unsendable,), {})()


def array_to_text(a: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, a, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def text_to_array(text: str) -> np.ndarray:
    try:
        a = np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)
    except Exception as err:
        raise WireError(f"not an array: {err}") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in ARRAY_KINDS:
        raise WireError(f"an array of dtype {getattr(a, 'dtype', '?')} (only numbers cross)")
    return a


def pack(value, callable_id=None, depth=0):
    """value -> a JSON-able structure (see the module docstring). callable_id(fn) -> int registers a
    callable and returns its handle (the grader's side); without it a callable is an Unsendable."""
    if depth > MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return {"~": "scalar", "npy": array_to_text(np.asarray(value))} if value.dtype.kind in ARRAY_KINDS \
            else {"~": "object", "type": type(value).__name__}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in ARRAY_KINDS:
            return {"~": "object", "type": f"ndarray of dtype {value.dtype}"}
        return {"~": "array", "npy": array_to_text(value)}
    if isinstance(value, (list, tuple)):
        items = [pack(v, callable_id, depth + 1) for v in value]
        return items if isinstance(value, list) else {"~": "tuple", "v": items}
    if isinstance(value, dict):
        return {"~": "dict", "v": [[pack(k, callable_id, depth + 1), pack(v, callable_id, depth + 1)]
                                   for k, v in value.items()]}
    if isinstance(value, np.random.Generator):
        bit_generator = value.bit_generator
        return {"~": "rng", "bit_generator": type(bit_generator).__name__, "state": bit_generator.state}
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and \
            type(value).__module__.startswith("tarflow_ref."):
        fields = {f.name: pack(getattr(value, f.name), callable_id, depth + 1) for f in dataclasses.fields(value)}
        return {"~": "dataclass", "type": f"{type(value).__module__}:{type(value).__qualname__}", "fields": fields}
    if callable(value) and callable_id is not None:
        return {"~": "callable", "id": callable_id(value), "name": getattr(value, "__name__", "function")}
    if hasattr(value, "__array__") and not callable(value):    # a torch tensor or another array type
        try:
            return pack(np.asarray(value), callable_id, depth)
        except Exception:
            pass
    return {"~": "object", "type": type(value).__name__}


def unpack(data, stub=None, depth=0):
    """The inverse of pack, building plain values only. stub(handle, name) -> a callable for a
    callable's handle: given on the kernel's side, which alone also rebuilds dataclasses; without
    it (the grader reading the kernel) a callable or a dataclass arrives as an Unsendable."""
    if depth > MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH}")
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [unpack(v, stub, depth + 1) for v in data]
    if not isinstance(data, dict):
        raise WireError(f"unexpected {type(data).__name__}")
    tag = data.get("~")
    if tag == "tuple":
        return tuple(unpack(v, stub, depth + 1) for v in _list(data, "v"))
    if tag == "dict":
        out = {}
        for pair in _list(data, "v"):
            if not isinstance(pair, list) or len(pair) != 2:
                raise WireError("a dict entry that is not a [key, value] pair")
            key = unpack(pair[0], stub, depth + 1)
            try:
                out[key] = unpack(pair[1], stub, depth + 1)
            except TypeError:
                raise WireError(f"a dict key of type {type(key).__name__}") from None
        return out
    if tag in ("array", "scalar"):
        a = text_to_array(_text(data, "npy"))
        return a[()] if tag == "scalar" else a
    if tag == "rng":
        return generator(_text(data, "bit_generator"), data.get("state"))
    if tag in ("dataclass", "callable") and stub is None:
        return unsendable(_text(data, "type") if tag == "dataclass" else "function")
    if tag == "dataclass":
        return dataclass_instance(_text(data, "type"), data.get("fields"), stub, depth)
    if tag == "callable":
        return stub(int(data.get("id", -1)), _text(data, "name"))
    if tag == "object":
        return unsendable(_text(data, "type"))
    raise WireError(f"unknown tag {str(tag)[:20]!r}")


def generator(kind: str, state) -> np.random.Generator:
    if kind not in BIT_GENERATORS or not isinstance(state, dict):
        raise WireError(f"not a NumPy bit generator: {kind[:20]!r}")
    bit_generator = getattr(np.random, kind)()
    try:
        bit_generator.state = state
    except Exception as err:
        raise WireError(f"a bad {kind} state: {err}") from None
    return np.random.Generator(bit_generator)


def dataclass_instance(type_name: str, fields, stub, depth):
    module, _, qualname = type_name.partition(":")
    if not module.startswith("tarflow_ref.") or not isinstance(fields, dict):
        raise WireError(f"not a tarflow_ref dataclass: {type_name[:80]!r}")
    cls = getattr(importlib.import_module(module), qualname)
    if not dataclasses.is_dataclass(cls):
        raise WireError(f"{type_name} is not a dataclass")
    return cls(**{k: unpack(v, stub, depth + 1) for k, v in fields.items()})


def _list(data, key):
    value = data.get(key)
    if not isinstance(value, list):
        raise WireError(f"{key!r} is not a list")
    return value


def _text(data, key):
    value = data.get(key)
    if not isinstance(value, str):
        raise WireError(f"{key!r} is not a string")
    return value
