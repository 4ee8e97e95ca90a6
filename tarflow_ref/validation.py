"""Checks of what a user gives the library, shared by the NumPy reference and the torch backend:
arrays (type, dtype, device, shape), labels, numbers, seeds and weights. Each raises ValueError
(or the error class its caller passes) with one line naming the argument, what it must be and
what it is, before any work.

No torch here: an array is read only through `type(x)`, `.dtype`, `.device`, `.ndim`, `.shape`
and `max()`, and each backend states what it takes as an `Arrays`: `NUMPY` below, and
torch_backend/checks.py's `tensors_of(model)` (a torch.Tensor of the model's dtype, on its device).
Shapes follow book/checkpoints.md, "Patches and token order": images x: [B, c, S, S], tokens
z: [B, T, D] with T = (S/P)^2, D = c P^2; labels y: [B] signed integers, y < 0 meaning "no label".
"""
import math
import numbers
from dataclasses import dataclass

import numpy as np

SEED_LIMIT = 2 ** 32        # seeds are 0 .. 2^32 - 1: numpy's and torch's generators take every one of them


@dataclass(frozen=True)
class Arrays:
    """The arrays a backend takes: instances of `type`, values of `dtype` (None: any floating
    dtype), on `device` (None: anywhere); `convert` tells how to make one from what it is not."""
    type: type
    dtype: object = None
    device: object = None
    convert: str = ""

    def check(self, name: str, x, values: str = "floating"):
        """ValueError unless x is one of these arrays; values 'floating' (data) or 'labels' (signed integers)."""
        if not isinstance(x, self.type):
            hint = f" ({self.convert} converts it)" if self.convert and hasattr(x, "dtype") else ""
            raise ValueError(f"{name} must be a {type_name(self.type)}, got {type_name(type(x))}{hint}")
        kind = dtype_kind(x.dtype)
        if values == "labels":
            if kind != "int":
                raise ValueError(f"labels {name} must be signed integers (class indices, < 0 for no label), "
                                 f"got {x.dtype}")
        elif kind != "float":
            raise ValueError(f"{name} must hold floating-point values, got {x.dtype}")
        elif self.dtype is not None and x.dtype != self.dtype:
            raise ValueError(f"{name} is {x.dtype}, the model's weights are {self.dtype}; "
                             f"convert it (.to({self.dtype}))")
        if self.device is not None and x.device != self.device:
            raise ValueError(f"{name} is on device '{x.device}', the model on '{self.device}'; "
                             f"move it (.to('{self.device}'))")


NUMPY = Arrays(np.ndarray, convert="np.asarray")


def type_name(t: type) -> str:
    """'numpy.ndarray', 'torch.Tensor', 'list'."""
    module = t.__module__.split(".")[0]
    return t.__qualname__ if module == "builtins" else f"{module}.{t.__qualname__}"


def dtype_kind(dtype) -> str:
    """'float', 'int' (signed), 'uint', 'bool' or 'other', from the name of a NumPy or torch dtype."""
    name = str(dtype).removeprefix("torch.")
    for kind, prefixes in (("float", ("float", "bfloat")), ("uint", ("uint",)), ("int", ("int",)), ("bool", ("bool",))):
        if name.startswith(prefixes):
            return kind
    return "other"


def check_image(x, cfg, arrays: Arrays = NUMPY, name: str = "x"):
    """ValueError unless x is an image batch [B, c, S, S] of this configuration."""
    arrays.check(name, x)
    want = (cfg.channels, cfg.image_size, cfg.image_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        S, P = x.shape[-1] if x.ndim == 4 else 0, cfg.patch_size
        hint = f" (size {S} is not divisible by the patch {P})" if S % P else ""
        raise ValueError(f"expected images [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(x.shape)}{hint}")


def check_tokens(z, cfg, arrays: Arrays = NUMPY, name: str = "z"):
    """ValueError unless z is a token batch [B, T, D] of this configuration."""
    arrays.check(name, z)
    want = (cfg.tokens, cfg.token_dim)
    if z.ndim != 3 or tuple(z.shape[1:]) != want:
        raise ValueError(f"expected {name} of shape [B, {want[0]}, {want[1]}] (T tokens, D values), "
                         f"got {tuple(z.shape)}")


def check_labels(y, num_classes: int, batch: int, arrays: Arrays = NUMPY, name: str = "y"):
    """Labels y: [B] signed integers, or None; y < 0 means 'no label'."""
    if y is None:
        return
    arrays.check(name, y, values="labels")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"labels must have shape [{batch}], got {tuple(y.shape)}")
    if len(y) and int(y.max()) >= num_classes:
        bound = "this model is unconditional, so only labels < 0 are allowed" if num_classes == 0 \
            else f"labels must be < {num_classes} (or < 0 for no label)"
        raise ValueError(f"label {int(y.max())} is out of range: {bound}")


def shown(value) -> str:
    """A value as an error message shows it: numbers plainly (nan, -1.0, 3), anything else by repr."""
    return str(value) if isinstance(value, numbers.Number) else repr(value)


def check_real(name: str, value, *, at_least=None, above=None, note: str = "", error=ValueError) -> float:
    """value as a float: a finite real number (not a bool), >= at_least or > above, else `error`
    naming it. Written so that nan fails (every comparison with nan is False)."""
    bound = f" >= {at_least:g}" if at_least is not None else f" > {above:g}" if above is not None else ""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and (at_least is None or value >= at_least) and (above is None or value > above)
    if not ok:
        raise error(f"{name} must be a finite number{bound}{note}, got {shown(value)}")
    return float(value)


def check_integer(name: str, value, *, at_least=None, at_most=None, note: str = "", error=ValueError) -> int:
    """value as an int: an integer (not a bool, not a float) within the bounds, else `error` naming it."""
    if at_least is not None and at_most is not None:
        bound = f" in {at_least}..{at_most}"
    else:
        bound = f" >= {at_least}" if at_least is not None else f" <= {at_most}" if at_most is not None else ""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) \
        and (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
    if not ok:
        raise error(f"{name} must be an integer{bound}{note}, got {shown(value)}")
    return int(value)


def check_seed(seed, name: str = "seed") -> int:
    """A random seed: an integer in 0 .. 2^32 - 1."""
    return check_integer(name, seed, at_least=0, at_most=SEED_LIMIT - 1)


def noise_sigma(cfg, sigma=None) -> float:
    """The sigma of the denoising step: the explicit one, else the model's training noise."""
    sigma = cfg.noise_std if sigma is None else sigma
    if sigma is None:
        raise ValueError("this model has no training noise sigma (config.noise_std is None, e.g. a file "
                         "name without the released pattern); pass sigma= explicitly")
    return check_real("noise sigma", sigma, above=0)


def check_factor(factor) -> float:
    """The denoising factor: finite and >= 0."""
    return check_real("denoising factor", factor, at_least=0, note=" (1.0 is Tweedie's optimum)")


def nonfinite_keys(params: dict) -> list:
    """The names of the floating-point arrays of a NumPy parameter dict that hold NaN or infinity."""
    return [k for k, v in params.items() if dtype_kind(v.dtype) == "float" and not np.isfinite(v).all()]


def nonfinite_message(keys: list) -> str:
    more = f" and {len(keys) - 1} more tensors" if len(keys) > 1 else ""
    return f"the weights hold NaN or infinite values (in '{keys[0]}'{more}): the model diverged in training"


def check_finite_params(params: dict, use: str = "sampled"):
    """ValueError if a weight of the NumPy model is NaN or infinite: it could only give NaN."""
    bad = nonfinite_keys(params)
    if bad:
        raise ValueError(f"{nonfinite_message(bad)}; it cannot be {use}")
