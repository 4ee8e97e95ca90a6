"""A conditional flow is a classifier: Bayes' rule over its exact class-conditional likelihoods.

A conditional TarFlow gives log p(x | y) for every label y exactly (change of variables,
logdet.py). With a prior p(y) (uniform unless given), the posterior over the K classes is

    log p(y | x) = log p(x | y) + log p(y) - logsumexp_y' [log p(x | y') + log p(y')]

where log p(x | y) = -N * NLL_per_dim(x | y) is the TOTAL log-likelihood over the N = T * D
values (the per-dimension mean would shrink every log-ratio by 1/N and flatten the posterior,
though not its argmax). The constants of the dequantisation are the same for every y and cancel.

Shapes: images x: [B, c, S, S] in [-1, 1] -> log-likelihoods and log-posteriors [B, K].
"""
import torch

from ..logdet import nll_per_dim


@torch.no_grad()
def class_log_likelihoods(model, x, *, batch_size: int = 512) -> torch.Tensor:
    """log p(x | y) in nats for every class y: [B, K] (float64), one forward pass per class."""
    cfg = model.config
    if not cfg.conditional:
        raise ValueError("the flow is unconditional: it has no p(x | y) to classify with")
    dims = cfg.tokens * cfg.token_dim
    weight = next(model.parameters())                    # the model's device and dtype
    rows = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size].to(weight.device, weight.dtype)
        per_class = []
        for label in range(cfg.num_classes):
            y = torch.full((len(chunk),), label, device=weight.device, dtype=torch.long)
            z, logdet = model(chunk, y)
            per_class.append(-dims * nll_per_dim(z.double(), logdet.double()))
        rows.append(torch.stack(per_class, dim=1).cpu())                      # [b, K]
    return torch.cat(rows)


def log_posterior(log_likelihoods: torch.Tensor, log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """log p(y | x): [B, K] from log p(x | y): [B, K] and log p(y): [K] (uniform when None)."""
    scores = log_likelihoods if log_prior is None else log_likelihoods + log_prior
    return torch.log_softmax(scores, dim=1)


def classify(model, x, *, log_prior: torch.Tensor | None = None, batch_size: int = 512) -> torch.Tensor:
    """The most probable class of each image: [B] int64."""
    return log_posterior(class_log_likelihoods(model, x, batch_size=batch_size), log_prior).argmax(dim=1)
