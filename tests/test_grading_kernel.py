"""The checks say the same thing whether they call a student's function in their own process (the
notebook, while the student works) or in the student's kernel through a proxy (grading): the
same PASS, the same mistake message (tarflow_ref/grading/kernel.py, remote.py, wire.py).

The wrong functions cover every kind of input that crosses: arrays, numbers and strings, a pair
returned, a callable the student's code calls back (a conditioner, a score), a random generator,
batches of calls, an argument changed in place, state kept between calls. And a kernel whose
grader's agent was replaced earns nothing and breaks nothing.
"""
import tempfile
from pathlib import Path

import nbformat
import pytest

from tarflow_ref.grading import attention, denoising, flow, guidance, jacobi, likelihood, sandbox
from tarflow_ref.grading.kernel import StudentKernel

STUDENT = '''
import numpy as np

def shift_right(o):
    out = np.zeros_like(o)
    out[:, 1:] = o[:, :-1]
    return out

def shift_wrong_way(o):
    return np.concatenate([o[:, 1:], np.zeros_like(o[:, :1])], axis=1)

def shift_in_place(o):
    o[:, 1:] = o[:, :-1].copy()
    o[:, 0] = 0.0
    return o

def shift_none(o):
    return None

def shift_generator(o):
    return (x for x in o)

def forward_sum(u, f):
    a, m = f(u)
    a, m = shift_right(a), shift_right(m)
    return (u - m) * np.exp(-a), -a.sum(axis=(1, 2))

def inverse_one_pass(z, f):
    a, m = f(z)
    return z * np.exp(shift_right(a)) + shift_right(m)

def softmax_unstable(s):
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)

def attention_no_mask(q, k, v, start):
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v

CACHE = []
def decode_kept_cache(q, k, v):
    out = []
    for t in range(q.shape[1]):
        CACHE.append((k[:, t], v[:, t]))
        keys = np.stack([c[0] for c in CACHE], 1)
        values = np.stack([c[1] for c in CACHE], 1)
        s = q[:, t:t + 1] @ np.swapaxes(keys, -1, -2) / np.sqrt(q.shape[-1])
        e = np.exp(s - s.max(-1, keepdims=True))
        out.append((e / e.sum(-1, keepdims=True)) @ values)
    return np.concatenate(out, 1)

def update_from_z(x, z, f):
    a, m = f(z)
    new = z.copy()
    new[:, 1:] = z[:, 1:] * np.exp(a[:, :-1]) + m[:, :-1]
    return new

def dequantize_global_rng(x_int, rng):
    noise = np.random.default_rng(123).uniform(size=np.shape(x_int))
    return (np.asarray(x_int, dtype=np.float64) + noise) / 256 * 2 - 1

def nll_sum(z, logdet):
    return 0.5 * (z ** 2).reshape(len(z), -1).sum(-1) + 0.5 * np.log(2 * np.pi) - logdet

def guide_flipped(a, m, a_u, m_u, g, what):
    if "a" in what:
        a = a + g * (a_u - a)
    if "b" in what:
        m = m + g * (m_u - m)
    return a, m

def weight_off_by_one(t, T, g):
    return g * t / (T - 1)

def tweedie_sigma(x, score, sigma):
    return x + sigma * score(x)

def step_size_no_batch(batch, image_size, channels, sigma, factor):
    return image_size ** 2 * channels * sigma ** 2 * factor
'''

CASES = [
    (flow.check_shift, "shift_right"), (flow.check_shift, "shift_wrong_way"), (flow.check_shift, "shift_in_place"),
    (flow.check_shift, "shift_none"), (flow.check_shift, "shift_generator"),
    (flow.check_flow_forward, "forward_sum"), (flow.check_flow_inverse, "inverse_one_pass"),
    (attention.check_softmax, "softmax_unstable"), (attention.check_causal_attention, "attention_no_mask"),
    (attention.check_decode, "decode_kept_cache"), (jacobi.check_jacobi_update, "update_from_z"),
    (likelihood.check_dequantize, "dequantize_global_rng"), (likelihood.check_nll_per_dim, "nll_sum"),
    (guidance.check_guide, "guide_flipped"), (guidance.check_annealed_weight, "weight_off_by_one"),
    (denoising.check_tweedie, "tweedie_sigma"), (denoising.check_step_size, "step_size_no_batch"),
    (flow.check_shift, "not_defined"),
]


def outcome(check, fn, capsys):
    """What a check says about fn: its PASS line, or its error as 'Type: message'."""
    try:
        check(fn)
    except Exception as err:
        kind = getattr(err, "kind", type(err).__name__)
        return f"{kind}: {getattr(err, 'message', err)}"
    return capsys.readouterr().out.strip()


@pytest.fixture(scope="module")
def kernel():
    """A contained kernel that ran STUDENT (as root; unsafe, as the grader's user, otherwise)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(STUDENT)]
    containment = sandbox.probe()
    with tempfile.TemporaryDirectory() as work:
        uid = sandbox.fresh_uid() if containment.own_user else None
        with StudentKernel(nb, Path(work), containment, uid, sandbox.Limits(), 120) as running:
            running.run_cell(nb.cells[0], 0)
            running.setup({"modules": {}, "names": {}}, [])
            yield running


@pytest.mark.filterwarnings("ignore::RuntimeWarning")      # the unstable softmax overflows, here as there
@pytest.mark.parametrize("check, name", CASES, ids=[name for _, name in CASES])
def test_a_check_says_the_same_through_the_kernel(kernel, capsys, check, name):
    here = {}
    exec(STUDENT, here)
    through_kernel = outcome(check, kernel.function(name), capsys)
    if name == "not_defined":
        assert through_kernel == "NameError: name 'not_defined' is not defined"
    else:
        in_process = outcome(check, here[name], capsys)
        assert through_kernel == in_process
        assert in_process.startswith("PASS" if name == "shift_right" else "CheckFailed")


AGENTS = {       # a fake grader's agent the student's code puts in the kernel: what the check then says
    "def serve():\n    pass": "the grader's agent in the kernel failed",
    "def serve():\n    raise SystemExit('no')": "the grader's agent in the kernel failed",
    "def serve():\n"
    "    ask = get_ipython().kernel.raw_input\n"
    "    ask('[' * 100000)\n"
    "    ask('{not json')": "the grader's agent in the kernel failed",
    "def serve():\n"
    "    buffer = io.BytesIO()\n"
    "    np.save(buffer, np.array([print], dtype=object), allow_pickle=True)\n"
    "    array = {'~': 'array', 'npy': base64.b64encode(buffer.getvalue()).decode()}\n"
    "    ask = get_ipython().kernel.raw_input\n"
    "    ask(json.dumps({'op': 'ready'}))\n"
    "    ask(json.dumps({'op': 'done', 'results': [{'ok': True, 'value': array}]}))": "not an array",
    "def serve():\n"
    "    ask = get_ipython().kernel.raw_input\n"
    "    ask(json.dumps({'op': 'ready'}))\n"
    "    ask(json.dumps({'op': 'done', 'results': 'everything passed'}))": "sent no result",
}


def test_a_replaced_agent_earns_nothing():
    """The student's code replaces the grader's agent in the kernel: each check fails, saying so."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(STUDENT + "\nimport base64, io, json\n"
                                          "import tarflow_ref.grading.remote as remote")]
    nb.cells += [nbformat.v4.new_code_cell(agent + "\nremote.serve = serve") for agent in AGENTS]
    containment = sandbox.probe()
    with tempfile.TemporaryDirectory() as work:
        uid = sandbox.fresh_uid() if containment.own_user else None
        with StudentKernel(nb, Path(work), containment, uid, sandbox.Limits(), 60) as running:
            running.run_cell(nb.cells[0], 0)
            for index, error in enumerate(AGENTS.values(), 1):
                running.run_cell(nb.cells[index], index)
                with pytest.raises(Exception, match=error):
                    flow.check_shift(running.function("shift_right"))
