"""The torch side of validation.py: what the torch entry points (the model's forward and loss,
`sample`, `denoise`, GS-Jacobi, the diagnostics) take, and weights that can only give NaN.

An array argument must be a torch.Tensor of the model's dtype on the model's device: torch would
answer a NumPy array, a float64 batch for a float32 model or a tensor on another device with an
error from deep inside a layer, and it would silently cast a uint8 image batch. A model whose
weights hold NaN or infinity (diverged in training, or changed in memory after loading) is
refused before it samples or denoises, as load_checkpoint refuses such a file.
"""
import torch

from ..validation import Arrays, nonfinite_message


def tensors_of(model) -> Arrays:
    """The tensors `model` takes: torch.Tensor, the dtype and device of its weights."""
    weights = model.var
    return Arrays(torch.Tensor, weights.dtype, weights.device, convert="torch.from_numpy")


def nonfinite_keys(state: dict) -> list:
    """The keys of the floating-point tensors of a state dict that hold NaN or infinity (one
    device sync for all of them)."""
    floats = [(k, v) for k, v in state.items() if v.is_floating_point()]
    if not floats:
        return []
    device = floats[0][1].device
    finite = torch.stack([torch.isfinite(v).all().to(device) for _, v in floats]).tolist()
    return [k for (k, _), ok in zip(floats, finite) if not ok]


def check_finite_weights(model, use: str = "sampled"):
    """ValueError naming the first weight of `model` that holds NaN or infinity."""
    bad = nonfinite_keys(model.state_dict())
    if bad:
        raise ValueError(f"{nonfinite_message(bad)}; it cannot be {use}")
