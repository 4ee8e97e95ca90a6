"""Score denoising: one step of Tweedie's formula removes the training noise from samples
(book/checkpoints.md, "Score denoising"; Zhai et al. 2024, Sec. 2.5). NumPy reference.

TarFlow is trained on x = x0 + sigma * eps, eps ~ N(0, I), so it models the NOISY density p and
its samples carry that noise. For Gaussian noise the posterior mean of the clean image is exactly
(Tweedie's formula)

    E[x0 | x] = x + sigma^2 * grad_x log p(x).

The released evaluation writes the same step through the training loss L (a mean over the batch
of B images and their N = S^2 c values: L = (1/B) sum_i nll_i / N, nll_i = -log p(x_i) + const):

    x_hat = x - lambda * grad_x L,   lambda = B * S^2 * c * sigma^2 * factor,

since grad_{x_i} L = -(1/(B N)) grad log p(x_i) makes lambda * grad L = -factor * sigma^2 * score.
`factor` = 1 is the theoretical optimum; the released evaluation uses about 0.9-1.4 per model.
The B in lambda cancels against the 1/B of the mean, so the step is per sample and any split of
the batch into chunks gives the same result (torch_backend/denoising.py relies on it).

Shapes: x: [B, c, S, S] images, y: [B] labels (< 0 or None: the mean class embedding).
"""
from .backward import grad_log_prob
from .validation import check_factor, check_finite_params, noise_sigma


def step_size(cfg, batch: int, sigma: float, factor: float = 1.0) -> float:
    """The released lambda = B * S^2 * c * sigma^2 * factor for a batch-mean loss over `batch` images."""
    return batch * cfg.image_size ** 2 * cfg.channels * sigma ** 2 * factor


def denoise(params, cfg, x, y=None, factor=1.0, sigma=None):
    """x_hat = x + factor * sigma^2 * grad_x log p(x | y). x: [B, c, S, S] -> [B, c, S, S].

    sigma defaults to cfg.noise_std (a ValueError if the model has none and none is given).
    """
    sigma, factor = noise_sigma(cfg, sigma), check_factor(factor)
    check_finite_params(params, "used to denoise")
    return x + factor * sigma ** 2 * grad_log_prob(params, cfg, x, y)
