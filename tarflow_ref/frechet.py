"""The Fréchet distance between two Gaussians, and the streaming feature statistics it is computed
from: the Fréchet Inception Distance (FID; Heusel et al. 2017) with any feature network
(book/checkpoints.md, "FID statistics files").

A set of images becomes features f_1 .. f_n (rows of [n, F]); the set is summarised by a Gaussian
with the features' mean and covariance, and two sets are compared by the Fréchet (2-Wasserstein)
distance of their Gaussians (Dowson & Landau 1982):

    d^2 = ||mu_r - mu_g||^2 + tr S_r + tr S_g - 2 tr (S_r^{1/2} S_g S_r^{1/2})^{1/2}

Why the eigenvalues of the product S_r S_g give the last trace. For any matrices A, B the products
AB and BA have the same non-zero eigenvalues. Take A = S_r^{1/2} and B = S_r^{1/2} S_g: then
AB = S_r S_g and BA = S_r^{1/2} S_g S_r^{1/2}, which is symmetric positive semi-definite, so its
eigenvalues lambda_i are real and >= 0, its square root has the eigenvalues sqrt(lambda_i), and a
trace is the sum of the eigenvalues:

    tr (S_r^{1/2} S_g S_r^{1/2})^{1/2} = sum_i sqrt(lambda_i(S_r S_g))

No matrix square root is needed, only the eigenvalues of one (non-symmetric) product. Rounding
turns the zero and tiny eigenvalues of a rank-deficient product into small negative or complex
numbers; their complex square roots have a real part of about zero, so the sum keeps the real
parts, `sum_i sqrt(lambda_i).real`, which is how the released evaluation computes it.

The statistics are accumulated as float64 sums, so that batches can be added in any grouping,
merged across runs and saved mid-run (nothing but three arrays):

    s = sum_k f_k   [F]        C = sum_k f_k f_k^T   [F, F]        n
    mu = s / n                 S = (C - n mu mu^T) / (n - 1)       (the unbiased covariance)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 between N(mu1, sigma1) and N(mu2, sigma2); mu: [F], sigma: [F, F] symmetric PSD, in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[-1] if mu1.ndim == 1 else None
    for name, value, shape in (("mu1", mu1, (dim,)), ("mu2", mu2, (dim,)),
                               ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if dim is None or value.shape != shape:
            raise ValueError(f"{name} has shape {list(value.shape)}; expected means [F] and covariances [F, F] "
                             f"of one feature size (mu1 has shape {list(mu1.shape)})")
    diff = mu1 - mu2
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)    # [F], real >= 0 up to rounding
    trace_sqrt = np.sqrt(eigenvalues).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


@dataclass
class FeatureStats:
    """Streaming statistics of features: float64 sums s [F], C [F, F] and the count n (module docstring).

        stats = FeatureStats.empty(2048)
        for batch in batches:
            stats.add(features(batch))           # [B, F]
        fid = stats.frechet_distance(reference)

    `arrays()` / `from_arrays()` turn it into three named arrays and back (np.savez(path, **stats.arrays())
    saves it; the FID pipeline writes them into the released statistics layout).
    """
    feature_sum: np.ndarray       # [F] float64
    cov_sum: np.ndarray           # [F, F] float64
    n: int = 0

    def __post_init__(self):
        self.feature_sum = np.asarray(self.feature_sum)
        self.cov_sum = np.asarray(self.cov_sum)
        F = self.feature_sum.shape[0] if self.feature_sum.ndim == 1 else -1
        if F < 1 or self.cov_sum.shape != (F, F):
            raise ValueError(f"feature statistics need a sum [F] and a sum of outer products [F, F]; got shapes "
                             f"{list(self.feature_sum.shape)} and {list(self.cov_sum.shape)}")
        for name in ("feature_sum", "cov_sum"):
            if getattr(self, name).dtype != np.float64:
                raise ValueError(f"{name} must be float64 (sums of many features lose digits in float32), "
                                 f"got {getattr(self, name).dtype}")
        if int(self.n) != self.n or self.n < 0:
            raise ValueError(f"the number of samples must be a whole number >= 0, got {self.n}")
        self.n = int(self.n)

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(np.zeros(dim), np.zeros((dim, dim)), 0)

    @classmethod
    def of(cls, features) -> FeatureStats:
        """The statistics of features [n, F]."""
        features = np.asarray(features)
        if features.ndim != 2:
            raise ValueError(f"features must be [n, F], got shape {list(features.shape)}")
        return cls.empty(features.shape[1]).add(features)

    @property
    def dim(self) -> int:
        return self.feature_sum.shape[0]

    def add(self, features) -> FeatureStats:
        """Add a batch of features [B, F] (converted to float64 first); returns self."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got shape {list(f.shape)}")
        if not np.isfinite(f).all():
            raise ValueError("features hold NaN or infinity; such a batch must not reach the statistics")
        self.feature_sum += f.sum(axis=0)
        self.cov_sum += f.T @ f
        self.n += len(f)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """The statistics of both sets together (a new object): the sums add."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of {self.dim} and {other.dim} features")
        return FeatureStats(self.feature_sum + other.feature_sum, self.cov_sum + other.cov_sum, self.n + other.n)

    def mean(self) -> np.ndarray:
        """mu = s / n, [F]."""
        self._need(1)
        return self.feature_sum / self.n

    def cov(self) -> np.ndarray:
        """S = (C - n mu mu^T) / (n - 1), [F, F]."""
        self._need(2)
        mu = self.mean()
        return (self.cov_sum - self.n * np.outer(mu, mu)) / (self.n - 1)

    def frechet_distance(self, other: FeatureStats) -> float:
        """FID between the Gaussians of the two sets."""
        if other.dim != self.dim:
            raise ValueError(f"cannot compare statistics of {self.dim} and {other.dim} features")
        return frechet_distance(self.mean(), self.cov(), other.mean(), other.cov())

    def arrays(self) -> dict:
        """{'features_sum': [F], 'features_cov_sum': [F, F], 'features_num_samples': int64 []} (copies)."""
        return {"features_sum": self.feature_sum.copy(), "features_cov_sum": self.cov_sum.copy(),
                "features_num_samples": np.int64(self.n)}

    @classmethod
    def from_arrays(cls, arrays) -> FeatureStats:
        """Inverse of `arrays()` (a dict, or the NpzFile of np.load)."""
        missing = [k for k in ("features_sum", "features_cov_sum", "features_num_samples") if k not in arrays]
        if missing:
            raise ValueError(f"feature statistics lack {', '.join(missing)}")
        return cls(np.array(arrays["features_sum"]), np.array(arrays["features_cov_sum"]),
                   int(np.asarray(arrays["features_num_samples"])))

    def _need(self, count):
        if self.n < count:
            raise ValueError(f"statistics of {self.n} samples: the {'mean' if count == 1 else 'covariance'} "
                             f"needs at least {count}")
