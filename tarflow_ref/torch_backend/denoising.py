"""Score denoising in torch: x_hat = x - lambda * grad_x loss, autograd through `TarFlow.loss`
(book/checkpoints.md, "Score denoising"; the math and the NumPy twin are in denoising.py).

The batch is processed in chunks of at most `chunk_size` images so that the activations kept for
the backward pass stay bounded. Each chunk of b images uses the released step for ITS OWN batch
size, lambda_b = b * S^2 * c * sigma^2 * factor: the b cancels against the 1/b of the chunk's
batch-mean loss, so every image gets the same per-sample step, sigma^2 * factor * score, whatever
the chunking (tested in tests/test_denoise.py). Only grad_x is needed, so the parameters stop
requiring gradients for the duration: autograd then keeps no inputs of the linear layers, which
cuts the activation memory (benchmarks/RESULTS.md). With bf16=True the loss is computed under
bfloat16 autocast, as the released evaluation does on CUDA (on the CPU it runs too, slowly: that
is how the tests reach it).

x: [B, c, S, S] images, y: [B] labels or None -> x_hat: [B, c, S, S] (same dtype; not clipped).
"""
import contextlib

import torch

from ..denoising import step_size
from ..validation import check_factor, check_image, check_integer, check_labels, noise_sigma
from .checks import check_finite_weights, tensors_of
from .precision import autocast, check_bf16_model


@contextlib.contextmanager
def frozen(model):
    """Parameters do not require gradients inside the block; their previous flags come back after."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def denoise(model, x, y=None, *, factor=1.0, chunk_size=None, bf16=False, progress=None, sigma=None):
    """One Tweedie step on every image; `progress` wraps the loop over chunks (e.g. tqdm).

    sigma defaults to model.config.noise_std (a ValueError if the model has none and none is given).
    """
    cfg = model.config
    tensors = tensors_of(model)
    check_image(x, cfg, tensors)
    check_labels(y, cfg.num_classes, len(x), tensors)
    sigma, factor = noise_sigma(cfg, sigma), check_factor(factor)
    if bf16:
        check_bf16_model(next(model.parameters()).dtype)
    chunk_size = max(len(x), 1) if chunk_size is None else \
        check_integer("chunk_size", chunk_size, at_least=1, note=" (None: the whole batch)")
    check_finite_weights(model, "used to denoise")
    x_hat = torch.empty_like(x)
    starts = range(0, len(x), chunk_size)
    with frozen(model), autocast(x.device, bf16), torch.enable_grad():
        for s in (progress(starts) if progress else starts):
            chunk = x[s:s + chunk_size].detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(model.loss(chunk, None if y is None else y[s:s + chunk_size]), chunk)
            x_hat[s:s + chunk_size] = chunk.detach() - step_size(cfg, len(chunk), sigma, factor) * grad
    return x_hat
