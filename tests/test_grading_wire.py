"""Plain data between the grader and a student's kernel (tarflow_ref/grading/wire.py): what crosses
comes back equal, what must not cross (pickles, objects) does not, and a malformed message is a
WireError rather than anything else (the grader's side reads a message that is not JSON as none
of its own: tests/test_grading_kernel.py)."""
import base64
import io
import json

import numpy as np
import pytest

from tarflow_ref.grading import wire
from tarflow_ref.grading.report import CheckFailed, as_array
from tarflow_ref.guidance import Guidance


def round_trip(value):
    return wire.unpack(json.loads(json.dumps(wire.pack(value))))


def test_plain_values_cross_unchanged():
    rng = np.random.default_rng(0)
    value = {"z": rng.standard_normal((2, 3, 4)), "labels": np.array([0, 2], dtype=np.int64),
             "mask": np.array([True, False]), "pair": (np.float32(1.5), [1, 2.5, None, "ab"]),
             "nan": float("nan"), 3: np.complex128(1 + 2j)}
    back = round_trip(value)
    assert set(back) == set(value) and isinstance(back["pair"], tuple) and isinstance(back["pair"][1], list)
    for key in ("z", "labels", "mask"):
        assert back[key].dtype == value[key].dtype and np.array_equal(back[key], value[key])
    assert back["pair"][0] == np.float32(1.5) and type(back["pair"][0]) is np.float32
    assert back["pair"][1] == [1, 2.5, None, "ab"] and np.isnan(back["nan"]) and back[3] == 1 + 2j


def test_a_generator_crosses_as_a_copy_in_the_same_state():
    rng = np.random.default_rng(7)
    rng.uniform(size=3)
    copy = round_trip(rng)
    assert np.array_equal(copy.uniform(size=5), rng.uniform(size=5))


def test_callables_cross_as_handles_and_dataclasses_only_towards_the_kernel():
    registered = []

    def callable_id(fn):
        registered.append(fn)
        return len(registered) - 1
    text = json.dumps(wire.pack([len, Guidance(1.5, "a", annealed=True)], callable_id))
    assert registered == [len] and "builtin" not in text           # no code, only a handle
    stubbed = wire.unpack(json.loads(text), stub=lambda handle, name: ("stub", handle, name))
    assert stubbed == [("stub", 0, "len"), Guidance(1.5, "a", annealed=True)]
    as_the_grader_reads_it = wire.unpack(json.loads(text))          # no stub: nothing is built
    assert [type(v).__name__ for v in as_the_grader_reads_it] == ["function", "tarflow_ref_guidance_Guidance"]


def test_what_is_not_plain_data_arrives_as_an_unsendable_named_after_its_type():
    back = round_trip([(x for x in range(3)), object(), np.array([{"a": 1}], dtype=object), lambda: 0])
    assert [type(v).__name__ for v in back] == ["generator", "object", "ndarray_of_dtype_object", "function"]
    with pytest.raises(CheckFailed, match="expected an array, got generator"):
        as_array("f(x)", back[0], (3,))


def npy(a, allow_pickle=False):
    buffer = io.BytesIO()
    np.save(buffer, a, allow_pickle=allow_pickle)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("message, problem", [
    (f'{{"~": "array", "npy": "{npy(np.array([object()]), allow_pickle=True)}"}}', "not an array"),
    (f'{{"~": "array", "npy": "{npy(np.array(["text"]))}"}}', "only numbers cross"),
    ('{"~": "array", "npy": "not base64!"}', "not an array"),
    ('{"~": "eval", "v": "__import__(\'os\')"}', "unknown tag"),
    ('{"~": "dict", "v": [[[1], 2]]}', "a dict key of type list"),
    ('{"~": "rng", "bit_generator": "os.system", "state": {}}', "not a NumPy bit generator"),
    ("[" * 100 + "]" * 100, "nested deeper"),
    ('{"~": "scalar"}', "'npy' is not a string"),
])
def test_a_malformed_message_is_a_wire_error(message, problem):
    with pytest.raises(wire.WireError, match=problem):
        wire.unpack(json.loads(message))


def test_a_pickle_never_loads(tmp_path):
    """An object array's pickle would run code on loading; np.load without allow_pickle refuses it."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    message = json.dumps({"~": "array", "npy": npy(np.array([Payload()], dtype=object), allow_pickle=True)})
    with pytest.raises(wire.WireError):
        wire.unpack(json.loads(message))
    assert not marker.exists()
