"""Checks of assignment 04: uniform dequantisation, the likelihood per dimension and bits per dimension
(Zhai et al. 2024, Sec. 2.1; book/checkpoints.md, "Bits per dimension"; book/likelihood.md and
notebooks/04_logdet.ipynb teach it; the reference is tarflow_ref/logdet.py).

The student's functions (NumPy, float64), with N = T D values per sample and the released models'
logdet already a MEAN over those N values:

    dequantize(x_int, rng):   x_int: any shape, integers 0..255 -> x = ((x_int + u) / 256) * 2 - 1,
                              u = rng.uniform(size=x_int.shape) drawn in one call; same shape
    nll_per_dim(z, logdet):   z: [B, T, D], logdet: [B] -> -log p(x) / N in nats, [B]:
                              0.5 mean_{t,d} z^2 + 0.5 log(2 pi) - logdet
    bits_per_dim(z, logdet):  the same for dequantised 8-bit data, in bits, [B]:
                              (nll_per_dim + log 128) / log 2   (x = y / 128 - 1 for y in [0, 256),
                              so p_y(y) = p_x(x) / 128)

Each check compares with the package's functions (logdet.dequantize with the same seeded generator
on uint8 / int64 arrays of shapes [2, 1, 8, 8], [3, 5], [1, 3, 4, 4]; logdet.nll_per_dim and
logdet.bits_per_dim on seeded z of shapes [2, 16, 2], [3, 7, 3], [1, 5, 1] with random logdet) and
tests properties that need no reference:
  check_dequantize:   value k lands in its own bin, 128 (x + 1) in [k, k + 1); 20000 draws of one
                      level average to the bin centre ((2 k + 1) / 256 - 1, within 5 standard errors).
  check_nll_per_dim:  for the elementwise affine flow z = (x - mu) / s (so logdet = -mean log s) the
                      NLL per dimension is mean_{t,d} -log N(x; mu, s^2), which the checker computes
                      with scipy.stats.norm.logpdf.
  check_bits_per_dim: the same affine flow on dequantised 8-bit data gives
                      (mean -log N(x; mu, s^2) + log 128) / log 2; on the bundled digits model the
                      student's bits_per_dim of the model's own z, logdet (360 held-out digits, seed 0)
                      averages to the number `python -m tarflow_ref bpd` prints (train.evaluate_bpd).

Mistakes each check is designed to catch (tests/test_grading_likelihood.py writes each one):
  check_dequantize:   / 255 instead of / 256; no noise (x_int / 256 or the model input x_int / 255);
                      the range [0, 1] instead of [-1, 1]; uint8 arithmetic that wraps around (2 x_int);
                      noise from another generator (np.random, a fresh seed), or not drawn in one call.
  check_nll_per_dim:  the 0.5 log(2 pi) missing; + logdet instead of - logdet; a sum over the T D values
                      instead of the mean (of everything, or of z^2 only); the mean of z^2 over the whole
                      batch; one number for the whole batch (a scalar, or the batch mean for every sample).
  check_bits_per_dim: log 256 instead of log 128 (one bit too many); the result left in nats; the
                      dequantisation scale forgotten (in bits or in nats); log 128 nats added to bits.
  every check:        None, a wrong shape, NaN or inf; an input array changed in place.
"""
import math
from functools import lru_cache

import numpy as np
from scipy.stats import norm

from .. import logdet as reference
from .problems import bundled_digits
from .report import CheckFailed, as_array, call_unchanged, expect_close, hint, passed, same

LOG_128, LOG_2 = math.log(128), math.log(2)

# (seed, shape, dtype) of the 8-bit arrays to dequantise: an image batch, an odd 2-d array, int64
LEVELS = ((0, (2, 1, 8, 8), np.uint8), (1, (3, 5), np.uint8), (2, (1, 3, 4, 4), np.int64))
# (seed, batch, tokens, values per token): the toy block's size, an odd size, a single sample
SIZES = ((0, 2, 16, 2), (1, 3, 7, 3), (2, 1, 5, 1))
# the mean test: MANY draws of one level; 5 standard errors of their mean, (2 / 256) / sqrt(12 MANY)
LEVEL, MANY = 100, 20000
MEAN_TOLERANCE = 5 * (2 / 256) / math.sqrt(12 * MANY)


def levels(seed, shape, dtype):
    """Seeded 8-bit values of the given shape, holding both ends 0 and 255."""
    x_int = np.random.default_rng(seed).integers(0, 256, size=shape).astype(dtype)
    x_int.flat[:2] = 0, 255
    return x_int


def check_dequantize(fn):
    """fn(x_int, rng) -> x of x_int's shape (see the module docstring); prints PASS or raises CheckFailed."""
    results = []
    for seed, shape, dtype in LEVELS:
        x_int = levels(seed, shape, dtype)
        name = f"dequantize(x_int, rng) for {np.dtype(dtype).name} x_int of shape {list(shape)}"
        x = as_array(name, call_unchanged(name, fn, x_int=x_int, rng=np.random.default_rng(seed)), shape)
        mistake = dequantize_mistake(x, x_int, np.random.default_rng(seed).uniform(size=shape))
        if mistake:
            raise CheckFailed(f"{name}: {mistake}")
        bins = np.floor(128 * (x + 1))
        if (bins != x_int).any():
            i = tuple(int(j) for j in np.argwhere(bins != x_int)[0])
            k = int(x_int[i])
            raise CheckFailed(f"{name}: x_int{list(i)} = {k} became {x[i]:.6f}, outside its bin "
                              f"[2*{k}/256 - 1, 2*{k + 1}/256 - 1); x = ((x_int + u) / 256) * 2 - 1 "
                              "with u in [0, 1). With uint8 input, convert to float first (2 * x_int wraps "
                              "around above 127)")
        results.append((name, seed, x_int, x))
    check_bin_centre(fn)
    for name, seed, x_int, x in results:
        with hint("your values lie in the right bins and average to the bin centres, but the noise is not "
                  "the expected one: draw u = rng.uniform(size=x_int.shape) in ONE call from the rng you "
                  "are given, before anything else draws from it"):
            expect_close(name, x, reference.dequantize(x_int, np.random.default_rng(seed)))
    passed("dequantize", "every value in its bin [2k/256 - 1, 2(k+1)/256 - 1), 20000 draws of one level "
           "average to the bin centre; matches the reference on 3 arrays")


def dequantize_mistake(x, x_int, u):
    """What a dequantisation did wrong, in words, when x matches a known mistake (u: the right noise)."""
    k = np.asarray(x_int, dtype=np.float64)
    if same(x, (k + u) / 256 * 2 - 1):
        return None
    mistakes = (((k + u) / 255 * 2 - 1, "you divided by 255; the 256 bins of width 1 in [0, 256) map to "
                 "[-1, 1], so divide x_int + u by 256"),
                (k / 256 * 2 - 1, "no noise was added; add u = rng.uniform(size=x_int.shape) to x_int"),
                (k / 255 * 2 - 1, "that is the model's input x_int / 255 * 2 - 1, without noise; the "
                 "likelihood needs ((x_int + u) / 256) * 2 - 1"),
                ((k + u) / 256, "the values lie in [0, 1]; map them to [-1, 1] with * 2 - 1"))
    return next((text for want, text in mistakes if same(x, want)), None)


def check_bin_centre(fn):
    """MANY draws of LEVEL average to the bin centre (2 LEVEL + 1) / 256 - 1."""
    x_int = np.full((MANY // 100, 100), LEVEL, dtype=np.uint8)
    name = f"dequantize(x_int, rng) for {MANY} copies of level {LEVEL}"
    x = as_array(name, call_unchanged(name, fn, x_int=x_int, rng=np.random.default_rng(3)), x_int.shape)
    centre = (2 * LEVEL + 1) / 256 - 1
    if abs(x.mean() - centre) > MEAN_TOLERANCE:
        raise CheckFailed(f"{name}: their mean is {x.mean():.6f}, expected the bin centre {centre:.6f} "
                          f"(+- {MEAN_TOLERANCE:.1e}); u must be uniform on [0, 1), its mean 1/2")


def affine_flow(seed, batch, tokens, dim, x):
    """The elementwise affine flow z = (x - mu) / s with seeded mu, s: [B, T, D] on data x: [B, T, D]
    -> (z, logdet = -mean_{t,d} log s: [B], mean_{t,d} -log N(x; mu, s^2): [B] by scipy)."""
    rng = np.random.default_rng(100 + seed)
    mu = 0.5 * rng.standard_normal((batch, tokens, dim))
    s = np.exp(0.7 * rng.standard_normal((batch, tokens, dim)))
    nll = -norm.logpdf(x, loc=mu, scale=s).mean(axis=(1, 2))
    return (x - mu) / s, -np.log(s).mean(axis=(1, 2)), nll


def random_pair(seed, batch, tokens, dim):
    """Seeded z: [B, T, D] (standard deviation 1.5) and logdet: [B] of either sign."""
    rng = np.random.default_rng(seed)
    return 1.5 * rng.standard_normal((batch, tokens, dim)), rng.standard_normal(batch)


def per_sample(name, fn, z, logdet):
    """fn(z, logdet) as [B], checked for type, shape and finiteness, z and logdet left unchanged."""
    name = f"{name}(z, logdet) for z of shape {list(z.shape)}"
    return name, as_array(f"{name} (one value per sample)", call_unchanged(name, fn, z=z, logdet=logdet), z.shape[:1])


def check_nll_per_dim(fn):
    """fn(z: [B, T, D], logdet: [B]) -> [B] nats per dimension; prints PASS or raises CheckFailed."""
    for seed, batch, tokens, dim in SIZES[:2]:
        x = np.random.default_rng(seed).uniform(-1, 1, (batch, tokens, dim))
        z, logdet, want = affine_flow(seed, batch, tokens, dim, x)
        name, got = per_sample("nll_per_dim", fn, z, logdet)
        with hint(nll_mistake(got, z, logdet)):
            expect_close(f"{name} of the affine flow z = (x - mu) / s, against mean -log N(x; mu, s^2) "
                         "(scipy)", got, want)
    for size in SIZES:
        z, logdet = random_pair(*size)
        name, got = per_sample("nll_per_dim", fn, z, logdet)
        with hint(nll_mistake(got, z, logdet)):
            expect_close(name, got, reference.nll_per_dim(z, logdet))
    passed("nll_per_dim", "equals mean -log N(x; mu, s^2) (scipy) for an elementwise affine flow; matches "
           "the reference on 3 inputs (16, 7, 5 tokens)")


def nll_mistake(got, z, logdet):
    """Advice for an NLL per dimension that is not 0.5 mean(z^2) + 0.5 log(2 pi) - logdet."""
    n = z[0].size
    square = 0.5 * (z ** 2).reshape(len(z), -1).mean(-1)
    right = square + 0.5 * reference.LOG_2PI - logdet
    mistakes = ((right - 0.5 * reference.LOG_2PI, "the constant 0.5 log(2 pi) is missing: the training loss "
                 "drops it, the likelihood keeps it"),
                (right + 2 * logdet, "logdet has the wrong sign: log p(x) = log N(z; 0, I) + log|det dz/dx|, "
                 "so the NLL subtracts logdet"),
                (n * right, "that is -log p(x) of the whole sample, a sum over the T D values; divide by "
                 "T D (logdet is already a mean)"),
                (n * square + 0.5 * reference.LOG_2PI - logdet, "0.5 z^2 was summed over the T D values; take "
                 "its mean, as logdet is a mean"),
                (0.5 * (z ** 2).mean() + 0.5 * reference.LOG_2PI - logdet, "the mean of z^2 ran over the whole "
                 "batch; average over the tokens and values of each sample (axis=(1, 2))"),
                (np.full(len(z), right.mean()), "every sample got the batch mean; return one value per sample"))
    return next((text for want, text in mistakes if same(got, want)),
                "the NLL per dimension is 0.5 mean_{t,d} z^2 + 0.5 log(2 pi) - logdet, per sample")


def check_bits_per_dim(fn):
    """fn(z: [B, T, D], logdet: [B]) -> [B] bits per dimension; prints PASS or raises CheckFailed."""
    for seed, batch, tokens, dim in SIZES[:2]:
        x_int = levels(seed, (batch, tokens, dim), np.uint8)
        x = reference.dequantize(x_int, np.random.default_rng(seed))
        z, logdet, nll = affine_flow(seed, batch, tokens, dim, x)
        name, got = per_sample("bits_per_dim", fn, z, logdet)
        with hint(bits_mistake(got, z, logdet)):
            expect_close(f"{name} of the affine flow z = (x - mu) / s on dequantised 8-bit x, against "
                         "(mean -log N(x; mu, s^2) (scipy) + log 128) / log 2", got, (nll + LOG_128) / LOG_2)
    for size in SIZES:
        z, logdet = random_pair(*size)
        name, got = per_sample("bits_per_dim", fn, z, logdet)
        with hint(bits_mistake(got, z, logdet)):
            expect_close(name, got, reference.bits_per_dim(z, logdet))
    mean = check_digits(fn)
    passed("bits_per_dim", "equals (mean -log N(x; mu, s^2) + log 128) / log 2 for an affine flow; matches "
           f"the reference on 3 inputs; {mean:.3f} bits/dim on the 360 held-out digits, as `python -m "
           "tarflow_ref bpd` reports")


def bits_mistake(got, z, logdet):
    """Advice for bits per dimension that are not (nll_per_dim + log 128) / log 2."""
    nll = reference.nll_per_dim(z, logdet)
    mistakes = (((nll + math.log(256)) / LOG_2, "exactly one bit too many: [0, 256) maps to [-1, 1], a "
                 "scale of 2/256 = 1/128, so add log 128, not log 256"),
                (nll + LOG_128, "the result is in nats: divide by log 2 to get bits"),
                (nll / LOG_2, "the dequantisation scale is missing: x = y / 128 - 1 for y in [0, 256), so "
                 "add log 128 to the NLL per dimension before dividing by log 2"),
                (nll, "that is the NLL per dimension in nats: add log 128 (the scale of the "
                 "dequantisation) and divide by log 2"),
                (nll / LOG_2 + LOG_128, "log 128 nats were added to a value in bits; add log 128 before "
                 "dividing by log 2 (or add log2(128) = 7 bits after)"))
    return next((text for want, text in mistakes if same(got, want)),
                "bits per dimension are (nll_per_dim(z, logdet) + log 128) / log 2, per sample")


@lru_cache(maxsize=2)
def digits_flow(labelled: bool = True):
    """(z: [360, 64, 1], logdet: [360]) as NumPy float64: the bundled model's output on the held-out
    digits, dequantised with seed 0 (the CLI's default); labelled False uses the mean class embedding."""
    import torch

    model, images, labels = bundled_digits()
    x = torch.as_tensor(reference.dequantize(images, np.random.default_rng(0)), dtype=torch.float32)
    with torch.no_grad():
        z, logdet = model(x, torch.as_tensor(labels) if labelled else None)
    return z.double().numpy(), logdet.double().numpy()


def check_digits(fn):
    """The student's mean bits/dim of the bundled model on the held-out digits against the package's
    value (train.evaluate_bpd, the CLI's `bpd`); returns that mean."""
    from ..training.train import evaluate_bpd

    z, logdet = digits_flow(True)
    name, got = per_sample("bits_per_dim", fn, z, logdet)
    name = f"{name}, the bundled model on the 360 held-out digits"
    with hint(bits_mistake(got, z, logdet)):
        expect_close(name, got, reference.bits_per_dim(z, logdet))
    model, images, labels = bundled_digits()
    package = evaluate_bpd(model, images, labels, seed=0)
    # float32 forward passes in batches of 256 (the CLI's) and of 360 (here) differ in the last bits
    expect_close(f"{name}: the mean against `python -m tarflow_ref bpd`", got.mean(), package, rtol=1e-6)
    return got.mean()
