"""Checks of shapes, labels and settings, shared by the NumPy reference and the torch backend.

Each takes NumPy arrays or torch tensors alike (only `.ndim`, `.shape` and `max()`), and raises
ValueError with one line naming the problem, before any work. Shapes follow book/checkpoints.md,
"Patches and token order": images x: [B, c, S, S], tokens z: [B, T, D] with T = (S/P)^2,
D = c P^2; labels y: [B] ints, y < 0 meaning "no label".
"""
import math


def check_image(x, cfg):
    """ValueError unless x is an image batch [B, c, S, S] of this configuration."""
    want = (cfg.channels, cfg.image_size, cfg.image_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        S, P = x.shape[-1] if x.ndim == 4 else 0, cfg.patch_size
        hint = f" (size {S} is not divisible by the patch {P})" if S % P else ""
        raise ValueError(f"expected images [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(x.shape)}{hint}")


def check_tokens(z, cfg):
    """ValueError unless z is a token batch [B, T, D] of this configuration."""
    want = (cfg.tokens, cfg.token_dim)
    if z.ndim != 3 or tuple(z.shape[1:]) != want:
        raise ValueError(f"expected z of shape [B, {want[0]}, {want[1]}] (T tokens, D values), got {tuple(z.shape)}")


def check_labels(y, num_classes: int, batch: int):
    """Labels y: [B] ints, or None; y < 0 means 'no label'."""
    if y is None:
        return
    if tuple(y.shape) != (batch,):
        raise ValueError(f"labels must have shape [{batch}], got {tuple(y.shape)}")
    if len(y) and int(y.max()) >= num_classes:
        bound = "this model is unconditional, so only labels < 0 are allowed" if num_classes == 0 \
            else f"labels must be < {num_classes} (or < 0 for no label)"
        raise ValueError(f"label {int(y.max())} is out of range: {bound}")


def noise_sigma(cfg, sigma=None) -> float:
    """The sigma of the denoising step: the explicit one, else the model's training noise."""
    sigma = cfg.noise_std if sigma is None else sigma
    if sigma is None:
        raise ValueError("this model has no training noise sigma (config.noise_std is None, e.g. a file "
                         "name without the released pattern); pass sigma= explicitly")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noise sigma must be a finite number > 0, got {sigma}")
    return float(sigma)


def check_factor(factor) -> float:
    """The denoising factor: finite and >= 0."""
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"denoising factor must be a finite number >= 0 (1.0 is Tweedie's optimum), got {factor}")
    return float(factor)
