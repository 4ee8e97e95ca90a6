"""The checks of assignment 06 (tarflow_ref/grading/denoising.py): right answers built from the
package (or, for the Gaussian score, torch autograd) pass; each mistake the module docstring lists,
written here as a small wrong function, is caught with a message that names it; a wrong shape, None
or NaN gets a clear message; NotImplementedError (the student version before any code is written)
propagates unchanged. Also the checker's own analytic inputs: the untrained flow's loss gradient and
the Monte Carlo draws.
"""
from importlib import import_module

import numpy as np
import pytest
import torch

from tarflow_ref import TarFlow
from tarflow_ref.config import TarFlowConfig
from tarflow_ref.grading import denoising as grading
from tarflow_ref.grading.denoising import (
    check_denoise_with_loss_gradient,
    check_gaussian_score,
    check_step_size,
    check_tweedie,
)
from tarflow_ref.grading.report import CheckFailed

from conftest import not_implemented, with_nan

package = import_module("tarflow_ref.denoising")


# ---- right answers from the package ------------------------------------------------------------

def autograd_score(x, mean, var):
    """d/dx of torch's Normal log-density, by autograd (an implementation independent of the formula)."""
    xt = torch.tensor(x, requires_grad=True)
    log_p = torch.distributions.Normal(torch.as_tensor(mean), torch.as_tensor(var) ** 0.5).log_prob(xt)
    (grad,) = torch.autograd.grad(log_p.sum(), xt)
    return grad.numpy()


def package_tweedie(x, score, sigma):
    """tarflow_ref.denoising.denoise with its score replaced by the given function (factor 1)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(package, "grad_log_prob", lambda params, cfg, v, y: score(v))
        return package.denoise({}, None, x, None, 1.0, sigma)            # no weights: the score is replaced


def package_step_size(batch, image_size, channels, sigma, factor):
    return package.step_size(TarFlowConfig(image_size=image_size, patch_size=1, channels=channels), batch, sigma,
                             factor)


def loss_step(x, grad_loss, lam):
    """The released step by its definition (no package function takes a gradient as input; the check
    compares it with the package's score step on the bundled model)."""
    return x - lam * grad_loss


@pytest.mark.parametrize("check, right, name", [
    (check_gaussian_score, autograd_score, "gaussian_score"),
    (check_tweedie, package_tweedie, "tweedie"),
    (check_step_size, package_step_size, "step_size"),
    (check_denoise_with_loss_gradient, loss_step, "denoise_with_loss_gradient"),
])
def test_a_right_answer_passes(check, right, name, capsys):
    check(right)
    assert capsys.readouterr().out.startswith(f"PASS {name}:")


@pytest.mark.parametrize("check", [check_gaussian_score, check_tweedie, check_step_size,
                                   check_denoise_with_loss_gradient])
def test_not_implemented_propagates(check):
    with pytest.raises(NotImplementedError):
        check(not_implemented)


# ---- gaussian_score ----------------------------------------------------------------------------

def score_in_place(x, mean, var):
    x -= mean
    x /= -var
    return x


@pytest.mark.parametrize("wrong, message", [
    (lambda x, mean, var: (x - mean) / var, "sign is wrong"),
    (lambda x, mean, var: -(x - mean) / np.sqrt(var), "divided by the standard deviation"),
    (lambda x, mean, var: -(x - mean) / var ** 2, r"against central differences .* with var the variance"),
    (score_in_place, "changed its argument x in place"),
    (lambda x, mean, var: None, "returned None"),
    (lambda x, mean, var: (-(x - mean) / var)[1:], r"expected shape \(7,\), got \(6,\)"),
    (lambda x, mean, var: with_nan(-(x - mean) / var), "not finite"),
], ids=["sign", "std", "var-squared", "in-place", "none", "shape", "nan"])
def test_gaussian_score_catches(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_gaussian_score(wrong)


# ---- tweedie -----------------------------------------------------------------------------------

def tweedie_in_place(x, score, sigma):
    x += sigma ** 2 * score(x)
    return x


@pytest.mark.parametrize("wrong, message", [
    (lambda x, score, sigma: x - sigma ** 2 * score(x), r"not below the .* a minus sign"),
    (lambda x, score, sigma: sigma ** 2 * score(x), r"not below the .* only the step"),
    (lambda x, score, sigma: x + sigma * score(x), r"posterior mean .* sigma, not sigma\^2"),
    (tweedie_in_place, "changed its argument x in place"),
    (lambda x, score, sigma: None, "returned None"),
    (lambda x, score, sigma: x[:-1], r"expected shape \(20000,\), got \(19999,\)"),
    (lambda x, score, sigma: with_nan(x + sigma ** 2 * score(x)), "not finite"),
], ids=["minus", "only-step", "sigma", "in-place", "none", "shape", "nan"])
def test_tweedie_catches(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_tweedie(wrong)


def test_the_monte_carlo_draws_separate_the_exact_step_from_the_noise():
    """On the check's draws the exact posterior mean beats x by a wide margin and lands on the
    posterior variance; the step with sigma (not sigma^2) still beats x there, so the exact
    Gaussian inputs after it are what names that mistake."""
    x0, x, score, sigma = grading.monte_carlo_problem()
    mc = grading.MONTE_CARLO
    posterior_variance = mc["s"] ** 2 * sigma ** 2 / (mc["s"] ** 2 + sigma ** 2)
    mse = {f: np.mean((x + f * sigma ** 2 * score(x) - x0) ** 2) for f in (0.0, 1.0, 1.0 / sigma)}
    assert mse[0.0] == pytest.approx(sigma ** 2, rel=0.03)
    assert mse[1.0] == pytest.approx(posterior_variance, rel=0.03) and mse[1.0] < 0.5 * mse[0.0]
    assert mse[1.0] < mse[1.0 / sigma] < mse[0.0]


# ---- step_size ---------------------------------------------------------------------------------

@pytest.mark.parametrize("wrong, message", [
    (lambda B, S, c, sigma, f: S ** 2 * c * sigma ** 2 * f, r"is not 6 times .*B missing"),
    (lambda B, S, c, sigma, f: B * S * c * sigma ** 2 * f, r"S instead of S\^2"),
    (lambda B, S, c, sigma, f: B * S ** 2 * sigma ** 2 * f, "channels c are missing"),
    (lambda B, S, c, sigma, f: B * S ** 2 * c * sigma * f, r"sigma instead of sigma\^2"),
    (lambda B, S, c, sigma, f: B * S ** 2 * c * sigma ** 2, "factor is missing"),
    (lambda B, S, c, sigma, f: 2 * B * S ** 2 * c * sigma ** 2 * f, r"lambda = B S\^2 c sigma\^2 factor \(B images"),
    (lambda B, S, c, sigma, f: None, "returned None"),
    (lambda B, S, c, sigma, f: np.full(2, B * S ** 2 * c * sigma ** 2 * f), r"expected shape \(\), got \(2,\)"),
    (lambda B, S, c, sigma, f: float("nan"), "not finite"),
], ids=["no-B", "S", "no-c", "sigma", "no-factor", "twice", "none", "shape", "nan"])
def test_step_size_catches(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_step_size(wrong)


# ---- denoise_with_loss_gradient ----------------------------------------------------------------

def loss_step_in_place(x, grad_loss, lam):
    x -= lam * grad_loss
    return x


@pytest.mark.parametrize("wrong, message", [
    (lambda x, g, lam: x + lam * g, "a plus sign"),
    (lambda x, g, lam: -lam * g, "only the step"),
    (lambda x, g, lam: x - g, r"untrained flow .* x_hat = x - lam \* grad_loss"),
    (loss_step_in_place, "changed its argument x in place"),
    (lambda x, g, lam: None, "returned None"),
    (lambda x, g, lam: (x - lam * g)[0], r"expected shape \(3, 2, 5, 5\), got \(2, 5, 5\)"),
    (lambda x, g, lam: with_nan(x - lam * g), "not finite"),
], ids=["plus", "only-step", "no-lam", "in-place", "none", "shape", "nan"])
def test_denoise_with_loss_gradient_catches(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_denoise_with_loss_gradient(wrong)


def test_a_step_right_on_the_untrained_flow_only_is_caught_on_the_digits():
    """A step that is right only for inputs shaped like the untrained flow's passes the analytic case;
    the comparison on the bundled model's digits catches it."""
    def shaped(x, g, lam):
        return x - lam * g if x.shape[1] == 2 else x - lam * g * 1.01
    with pytest.raises(CheckFailed, match=r"bundled model, labelled, factor 1.0\): against x \+ factor sigma"):
        check_denoise_with_loss_gradient(shaped)


def test_the_untrained_flow_has_the_analytic_loss_gradient():
    """The check's grad L = x / (B N) is torch autograd through an untrained TarFlow's loss."""
    cfg = TarFlowConfig(image_size=5, patch_size=1, channels=2, width=16, blocks=2, layers=1, head_dim=8)
    x = torch.tensor(np.random.default_rng(4).standard_normal((3, 2, 5, 5)), requires_grad=True)
    (grad,) = torch.autograd.grad(TarFlow(cfg).double().loss(x), x)
    np.testing.assert_allclose(grad.numpy(), x.detach().numpy() / (3 * 50), rtol=1e-12, atol=1e-15)


def test_the_digit_problems_have_a_real_step():
    """The bundled model's step is large against the 1e-10 tolerance, so a wrong step cannot hide in it."""
    for batch, labelled, factor, seed in grading.DIGIT_PROBLEMS:
        _, _, grad = grading.noisy_digits(batch, labelled, seed)
        lam = package_step_size(batch, 8, 1, 0.1, factor)
        assert np.abs(lam * grad).max() > 0.1
