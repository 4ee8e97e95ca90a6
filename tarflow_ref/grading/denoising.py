"""Checks for assignment 06: score denoising with Tweedie's formula.

Zhai et al. 2024, Sec. 2.5; book/checkpoints.md, "Score denoising"; book/denoising.md and
notebooks/07_score_denoising.ipynb teach it. The package's step is tarflow_ref/denoising.py (NumPy),
the score of a whole TarFlow tarflow_ref/backward.py (grad_log_prob). All arrays are NumPy float64.

    gaussian_score(x, mean, var)   grad_x log N(x; mean, var) = -(x - mean) / var, elementwise
                                   (mean, var broadcast against x)          -> same shape as x
    tweedie(x, score, sigma)       x_hat = x + sigma^2 score(x), score: a function [...] -> [...]
    step_size(B, S, c, sigma, factor)                lambda = B S^2 c sigma^2 factor  -> a number
    denoise_with_loss_gradient(x, grad_loss, lam)    x_hat = x - lam grad_loss,  x: [B, c, S, S]

Tweedie: if x = x0 + sigma eps with eps ~ N(0, I), then E[x0 | x] = x + sigma^2 grad_x log p(x),
p the density of the NOISY x. The released code writes the step through the training loss
L = (1/B) sum_i nll_i / N (N = S^2 c values per image, nll_i = -log p(x_i) + const), so
grad_{x_i} L = -score(x_i) / (B N) and x - lambda grad L = x + factor sigma^2 score(x): the B in
lambda cancels the batch mean, so the step of each image does not depend on the batch around it.

What each check tests: first properties that need no reference, then the package's reference.
  check_gaussian_score  central finite differences of scipy.stats.norm.logpdf (exact up to
                        rounding: log N is quadratic in x), then -(x - mean) / var; x of shapes
                        [7], [3, 4] (a mean and a variance per column), [2, 1, 5, 5]; var != 1.
  check_tweedie         x0 ~ N(mu, s^2) and x = x0 + sigma eps: the noisy density is
                        N(mu, s^2 + sigma^2) and E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu).
                        Monte Carlo (20000 seeded draws): the estimate is closer to x0 in mean
                        square than x is; then the exact posterior mean on x of shapes [6], [3, 5],
                        [2, 1, 3, 3]; then, with the score of a random TarFlow (grading.problems.TOY,
                        weights away from the initialisation), tarflow_ref.denoising.denoise.
  check_step_size       lambda(B) = B lambda(1) (chunks of any size get the same step per image),
                        then tarflow_ref.denoising.step_size on 4 configurations (the first one's
                        B, S, c, 1/sigma and factor all differ, so a missing one shows by its ratio).
  check_denoise_with_loss_gradient   on the untrained flow (the identity map, p = N(0, I)), whose
                        loss gradient is analytic, grad L = x / (B N), and whose Tweedie step is
                        (1 - factor sigma^2) x; then on noisy held-out digits with the bundled model:
                        grad L by torch autograd through TarFlow.loss (float64), lambda from the
                        package's step_size, against tarflow_ref.denoising.denoise (the score from the
                        NumPy backward pass) within 1e-10, for 3 labelled and 5 unlabelled digits.

Mistakes each check is built to catch (tests/test_grading_denoising.py writes each one):
  check_gaussian_score  the wrong sign; dividing by the standard deviation sqrt(var), not var;
                        writing into x in place.
  check_tweedie         a minus sign (x - sigma^2 score: away from the data); sigma instead of
                        sigma^2; returning only the step sigma^2 score(x); writing into x in place.
  check_step_size       forgetting B (the loss is a mean over the batch); S instead of S^2; a
                        missing c; sigma instead of sigma^2; the factor left out.
  check_denoise_with_loss_gradient   a plus sign (x + lam grad L climbs the loss); returning only
                        the step; ignoring lam; writing into x in place.
every check             None, a wrong shape, NaN or inf.
"""
import copy
from functools import cache

import numpy as np
import torch
from scipy.stats import norm

from ..backward import grad_log_prob
from ..config import TarFlowConfig
from ..denoising import denoise, step_size as reference_step_size
from ..io.checkpoint import to_numpy
from ..training.data import to_model_range
from .problems import TOY, bundled_digits, random_params
from .report import CheckFailed, as_array, call_unchanged, expect_close, hint, passed, same

# central differences of log N, a quadratic: no truncation error, rounding ~ 1e-16 |log N| / STEP
STEP = 1e-5
# (shape, mean, var): a scalar mean and var; one per column of [3, 4]; an odd image batch
SCORE_PROBLEMS = (((7,), 0.5, 0.25),
                  ((3, 4), np.array([-1.0, 0.0, 0.5, 2.0]), np.array([0.3, 0.5, 2.5, 4.0])),
                  ((2, 1, 5, 5), -1.0, 4.0))
# (shape, mu, s, sigma): clean data N(mu, s^2), noise sigma
TWEEDIE_PROBLEMS = (((6,), 0.3, 0.5, 0.2), ((3, 5), -1.0, 1.5, 0.7), ((2, 1, 3, 3), 2.0, 0.8, 0.1))
# Monte Carlo: sigma = 0.7 makes the noise larger than the clean spread s = 0.6
MONTE_CARLO = dict(draws=20000, mu=0.5, s=0.6, sigma=0.7)
# (batch, image_size, channels, sigma, factor)
STEP_PROBLEMS = ((6, 32, 3, 0.07, 1.2),            # B, S, c, 1/sigma, factor all differ
                 (360, 8, 1, 0.1, 1.0),            # the bundled digits model, all 360 held-out digits
                 (4, 64, 3, 0.05, 1.3),            # imagenet64_model_2_768_8_8_0.05
                 (3, 256, 3, 0.07, 0.9))           # afhq_model_8_768_8_8_0.07
# noisy held-out digits for the bundled model: (batch, labelled, factor, seed)
DIGIT_PROBLEMS = ((3, True, 1.0, 0), (5, False, 1.3, 1))
DIGITS_ATOL = 1e-10        # the two float64 routes to the step agree to ~2e-15 (measured)


def check_gaussian_score(fn):
    """fn(x, mean, var) -> grad_x log N(x; mean, var): same shape as x; prints PASS or raises CheckFailed."""
    rng = np.random.default_rng(0)
    for shape, mean, var in SCORE_PROBLEMS:
        x = rng.uniform(-3, 3, shape)
        name = f"gaussian_score(x, mean, var) for x of shape {list(shape)}"
        got = as_array(name, call_unchanged(name, fn, x=x, mean=mean, var=var), shape)
        std = np.sqrt(var)
        numeric = (norm.logpdf(x + STEP, mean, std) - norm.logpdf(x - STEP, mean, std)) / (2 * STEP)
        with hint(score_mistake(got, x, mean, var)):
            expect_close(f"{name}, against central differences of scipy.stats.norm.logpdf", got, numeric,
                         rtol=1e-7, atol=1e-7)
            expect_close(name, got, -(x - mean) / var)
    passed("gaussian_score", "equals the finite-difference derivative of scipy's log N and -(x - mean) / var "
           "on 3 inputs (scalar and per-column mean and variance)")


def score_mistake(got, x, mean, var):
    """What a Gaussian score did wrong, in words."""
    right = -(x - mean) / var
    if same(got, -right):
        return ("the sign is wrong: log N falls as x moves away from the mean, so its gradient "
                "-(x - mean) / var points back TOWARDS the mean")
    if same(got, -(x - mean) / np.sqrt(var)):
        return ("you divided by the standard deviation sqrt(var): log N = -(x - mean)^2 / (2 var) + const, "
                "whose derivative divides by the VARIANCE var")
    return "grad_x log N(x; mean, var) = -(x - mean) / var, elementwise, with var the variance"


def check_tweedie(fn):
    """fn(x, score, sigma) -> x_hat = x + sigma^2 score(x), same shape as x; prints PASS or raises CheckFailed."""
    x0, x, score, sigma = monte_carlo_problem()
    name = f"tweedie(x, score, {sigma}) for x of shape [{len(x)}]"
    got = as_array(name, call_unchanged(name, fn, x=x, score=score, sigma=sigma), x.shape)
    mse_noisy, mse_tweedie = np.mean((x - x0) ** 2), np.mean((got - x0) ** 2)
    if not mse_tweedie < mse_noisy:
        s2 = MONTE_CARLO["s"] ** 2
        raise CheckFailed(f"{name}, x = x0 + sigma eps on seeded draws x0 ~ N(mu, s^2): the mean squared error of "
                          f"your estimate to the clean x0 is {mse_tweedie:.4g}, not below the {mse_noisy:.4g} of x "
                          f"itself (the exact posterior mean reaches s^2 sigma^2 / (s^2 + sigma^2) = "
                          f"{s2 * sigma ** 2 / (s2 + sigma ** 2):.4g}); {tweedie_mistake(got, x, score(x), sigma)}")
    rng = np.random.default_rng(1)
    for shape, mu, s, sigma in TWEEDIE_PROBLEMS:
        x = rng.normal(mu, s, shape) + sigma * rng.standard_normal(shape)
        name = f"tweedie(x, score, {sigma}) for the clean data N({mu}, {s}^2), x of shape {list(shape)}"
        score = noisy_gaussian_score(mu, s, sigma)
        got = as_array(name, call_unchanged(name, fn, x=x, score=score, sigma=sigma), shape)
        with hint(tweedie_mistake(got, x, score(x), sigma)):
            expect_close(f"{name}: the posterior mean mu + s^2 / (s^2 + sigma^2) (x - mu)", got,
                         mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu))
    params, sigma = random_params(TOY, seed=2), 0.3
    x = rng.uniform(-1, 1, (3, TOY.channels, TOY.image_size, TOY.image_size))
    name = f"tweedie(x, score, {sigma}) with the score of a random TarFlow, x of shape {list(x.shape)}"
    got = as_array(name, call_unchanged(name, fn, x=x, score=lambda v: grad_log_prob(params, TOY, v), sigma=sigma),
                   x.shape)
    expect_close(name, got, denoise(params, TOY, x, None, 1.0, sigma))
    passed("tweedie", f"beats the noisy x in mean square ({mse_tweedie:.4f} < {mse_noisy:.4f}), equals the exact "
           "Gaussian posterior mean on 3 inputs, and the package's step with a TarFlow's score")


def noisy_gaussian_score(mu, s, sigma):
    """The score of the noisy density N(mu, s^2 + sigma^2) of x = x0 + sigma eps, x0 ~ N(mu, s^2)."""
    return lambda v: -(v - mu) / (s ** 2 + sigma ** 2)


def monte_carlo_problem():
    """(x0, x, score, sigma): seeded clean draws x0 ~ N(mu, s^2): [draws], their noisy versions
    x = x0 + sigma eps, and the score of the noisy density."""
    mc = MONTE_CARLO
    rng = np.random.default_rng(3)
    x0 = rng.normal(mc["mu"], mc["s"], mc["draws"])
    x = x0 + mc["sigma"] * rng.standard_normal(mc["draws"])
    return x0, x, noisy_gaussian_score(mc["mu"], mc["s"], mc["sigma"]), mc["sigma"]


def tweedie_mistake(got, x, score, sigma):
    """What a Tweedie step did wrong, in words; score: the score's values at x."""
    if same(got, x - sigma ** 2 * score):
        return ("a minus sign: the score points towards where the data is more likely, so the step "
                "ADDS it, x + sigma^2 score(x)")
    if same(got, x + sigma * score):
        return "you used sigma, not sigma^2: the step is sigma^2 score(x), the noise VARIANCE times the score"
    if same(got, sigma ** 2 * score):
        return "you returned only the step sigma^2 score(x); the estimate is x plus that step"
    return "x_hat = x + sigma^2 * score(x), with score(x) the function evaluated at x"


def check_step_size(fn):
    """fn(batch, image_size, channels, sigma, factor) -> lambda; prints PASS or raises CheckFailed."""
    for batch, size, channels, sigma, factor in STEP_PROBLEMS:
        name = f"step_size({batch}, {size}, {channels}, {sigma}, {factor})"
        lam = float(as_array(name, call_unchanged(name, fn, batch=batch, image_size=size, channels=channels,
                                                  sigma=sigma, factor=factor), ()))
        one_name = f"step_size(1, {size}, {channels}, {sigma}, {factor})"
        one = float(as_array(one_name, call_unchanged(one_name, fn, batch=1, image_size=size, channels=channels,
                                                      sigma=sigma, factor=factor), ()))
        if not same(lam, batch * one):
            raise CheckFailed(f"{name} = {lam:.6g} is not {batch} times {one_name} = {one:.6g}: the loss is a "
                              "MEAN over the batch, so grad L carries a factor 1/B that lambda must cancel, or "
                              "the step each image gets depends on how many images share its batch (B missing?)")
        want = reference_step_size(TarFlowConfig(image_size=size, patch_size=1, channels=channels), batch, sigma,
                                   factor)
        with hint(step_size_mistake(lam, want, size, channels, sigma, factor)):
            expect_close(name, lam, want)
    passed("step_size", "lambda(B) = B lambda(1), and lambda = B S^2 c sigma^2 factor on 4 configurations "
           "(digits 8x8 grey, 32x32, ImageNet 64x64, AFHQ 256x256)")


def step_size_mistake(lam, want, size, channels, sigma, factor):
    """What a step size did wrong, named by the ratio want / lam when it is one of the factors."""
    ratios = {size: "S instead of S^2: an image has N = S^2 c values (S x S pixels, c channels)",
              channels: "the channels c are missing: an image has N = S^2 c values",
              sigma: "sigma instead of sigma^2: Tweedie's step is the noise VARIANCE times the score",
              factor: "the factor is missing: lambda = B S^2 c sigma^2 factor"}
    for ratio, advice in ratios.items():
        if ratio != 1 and same(lam * ratio, want):
            return advice
    return "lambda = B S^2 c sigma^2 factor (B images of S x S pixels and c channels)"


def check_denoise_with_loss_gradient(fn):
    """fn(x, grad_loss, lam) -> x_hat: [B, c, S, S]; prints PASS or raises CheckFailed."""
    x = np.random.default_rng(4).standard_normal((3, 2, 5, 5))
    batch, n_values, sigma = len(x), x[0].size, 0.2
    grad_loss = x / (batch * n_values)                   # L = mean over batch and values of x^2 / 2 + const
    lam = reference_step_size(TarFlowConfig(image_size=5, patch_size=1, channels=2), batch, sigma)
    name = (f"denoise_with_loss_gradient(x, grad_loss, {lam:.4g}) on the untrained flow (p = N(0, I)), "
            "x of shape [3, 2, 5, 5]")
    got = as_array(name, call_unchanged(name, fn, x=x, grad_loss=grad_loss, lam=lam), x.shape)
    with hint(loss_step_mistake(got, x, grad_loss, lam)):
        expect_close(f"{name}: Tweedie's step with the score -x, (1 - sigma^2) x", got, (1 - sigma ** 2) * x)
    model, params, cfg, clean, labels = bundled_model()
    for batch, labelled, factor, seed in DIGIT_PROBLEMS:
        x, y, grad_loss = noisy_digits(batch, labelled, seed)
        lam = reference_step_size(cfg, batch, cfg.noise_std, factor)
        name = (f"denoise_with_loss_gradient(x, grad_loss, {lam:.4g}) for {batch} noisy held-out digits "
                f"(bundled model, {'labelled' if labelled else 'no labels'}, factor {factor})")
        got = as_array(name, call_unchanged(name, fn, x=x, grad_loss=grad_loss, lam=lam), x.shape)
        with hint(loss_step_mistake(got, x, grad_loss, lam)):
            expect_close(f"{name}: against x + factor sigma^2 score(x) with the model's score", got,
                         denoise(params, cfg, x, y, factor), rtol=0.0, atol=DIGITS_ATOL)
    passed("denoise_with_loss_gradient", "x - lam grad L is Tweedie's step: (1 - sigma^2) x on the untrained "
           "flow, and the package's x + factor sigma^2 score(x) on 3 + 5 noisy digits (bundled model)")


def loss_step_mistake(got, x, grad_loss, lam):
    """What a loss-gradient step did wrong, in words."""
    if same(got, x + lam * grad_loss):
        return ("a plus sign: the loss is the NEGATIVE log-density, so Tweedie's step (uphill in log p) "
                "goes DOWN the loss, x - lam * grad_loss")
    if same(got, -lam * grad_loss) or same(got, lam * grad_loss):
        return "you returned only the step; the denoised image is x minus lam * grad_loss"
    return "x_hat = x - lam * grad_loss, with the step size lam as given"


@cache
def bundled_model():
    """(model, params, cfg, clean, labels): the bundled digits TarFlow in float64 (torch and NumPy
    parameters), and the 360 held-out digits, clean: [360, 1, 8, 8] in [-1, 1], labels: [360]."""
    model, images, labels = bundled_digits()
    model = copy.deepcopy(model).double()
    return model, to_numpy(model), model.config, to_model_range(images).double().numpy(), labels


def noisy_digits(batch, labelled, seed):
    """(x: [B, 1, 8, 8], y: [B] or None, grad_loss: [B, 1, 8, 8]): held-out digits plus the model's
    noise sigma, and the gradient of the training loss, by torch autograd through TarFlow.loss."""
    model, _, cfg, clean, labels = bundled_model()
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(clean), batch, replace=False)
    x = clean[pick] + cfg.noise_std * rng.standard_normal(clean[pick].shape)
    y = labels[pick] if labelled else None
    xt = torch.tensor(x, requires_grad=True)
    (grad,) = torch.autograd.grad(model.loss(xt, None if y is None else torch.as_tensor(y)), xt)
    return x, y, grad.numpy()
