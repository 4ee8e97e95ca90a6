"""Log-determinant, Gaussian prior and likelihood (book/checkpoints.md, "Bits per dimension";
Zhai et al. 2024, Sec. 2.1).

A flow maps data x to noise z = f(x) with a standard normal prior, so by change of variables

    log p(x) = log N(z; 0, I) + log |det dz/dx|.

Per dimension (N = T * D values per sample), with the block log-det already a mean (flow.py):

    NLL(x) / N = 0.5 mean(z^2) + 0.5 log(2 pi) - logdet                         (nats per dim)
    training loss = 0.5 mean(z^2) - mean_B(logdet)                             (constant dropped)

Bits per dimension of 8-bit images: dequantise x = ((x_int + u) / 256) * 2 - 1 with u ~ U(0, 1).
The map from [0, 256) to [-1, 1] scales every value by 1/128, which adds log 128 to the NLL:

    bpd = (NLL / N + log 128) / log 2.

Plain array arithmetic: the same functions serve NumPy arrays and torch tensors.
"""
import math

import numpy as np

LOG_2PI = math.log(2 * math.pi)


def prior_nll(z):
    """-log N(z; 0, I) per dimension, per sample. z: [B, T, D] -> [B]."""
    return 0.5 * (z ** 2).reshape(len(z), -1).mean(-1) + 0.5 * LOG_2PI


def nll_per_dim(z, logdet):
    """-log p(x) / N in nats, per sample. z: [B, T, D], logdet: [B] -> [B]."""
    return prior_nll(z) - logdet


def loss(z, logdet):
    """The training objective of the recipe: 0.5 mean(z^2) - mean(logdet), a scalar."""
    return 0.5 * (z ** 2).mean() - logdet.mean()


def dequantize(x_int, rng: np.random.Generator):
    """8-bit integers in 0..255 -> continuous values in [-1, 1] with uniform noise."""
    u = rng.uniform(size=np.shape(x_int))
    return (np.asarray(x_int, dtype=np.float64) + u) / 256 * 2 - 1


def bits_per_dim(z, logdet):
    """Bits per dimension of dequantised 8-bit data, per sample. z: [B, T, D], logdet: [B] -> [B]."""
    return (nll_per_dim(z, logdet) + math.log(128)) / math.log(2)
