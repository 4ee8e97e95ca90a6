"""The Fréchet distance (tarflow_ref/frechet.py) against independent computations: scipy's matrix
square root of the product, closed forms, NumPy's mean / cov of the same features."""
import numpy as np
import pytest
import scipy.linalg

from tarflow_ref.frechet import FeatureStats, frechet_distance


def random_cov(rng, dim, rank=None, floor=0.0):
    """A random covariance A A^T / dim of the given rank (default full), plus floor * I."""
    a = rng.standard_normal((dim, rank or dim)) * rng.uniform(0.1, 3.0, size=rank or dim)
    return a @ a.T / dim + floor * np.eye(dim)


def scipy_fid(mu1, s1, mu2, s2):
    """The textbook formula with scipy's matrix square root of the product (an independent route)."""
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


@pytest.mark.parametrize("dim, rank, floor", [(3, None, 0.0), (16, None, 0.0), (64, None, 0.0),
                                              (32, 8, 1e-8), (64, 63, 1e-10), (48, 40, 1e-6)],
                         ids=["3", "16", "64", "rank8+1e-8", "rank63+1e-10", "rank40+1e-6"])
def test_equals_scipy_sqrtm_of_the_product(rng, dim, rank, floor):
    """Full-rank and nearly singular covariances (rank r < F plus a tiny multiple of I)."""
    for _ in range(3):
        mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim) * 0.3
        s1, s2 = random_cov(rng, dim, rank, floor), random_cov(rng, dim, rank, floor)
        ours, theirs = frechet_distance(mu1, s1, mu2, s2), scipy_fid(mu1, s1, mu2, s2)
        assert abs(ours - theirs) <= 1e-6 * abs(theirs), (ours, theirs)


def test_closed_forms(rng):
    """Diagonal covariances: sum (sqrt(a) - sqrt(b))^2; a Gaussian against itself: 0; a shift: its length^2."""
    a, b = rng.uniform(0.1, 4, 10), rng.uniform(0.1, 4, 10)
    mu = rng.standard_normal(10)
    assert frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2),
                                                                             rel=1e-12)
    s = random_cov(rng, 10)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-10 * np.trace(s)
    # rank 5 in 200 dimensions (as 2048 Inception features of a few images): the 195 zero eigenvalues
    # of the product come out as rounding noise, so ~0 means |d| < 1e-5 tr S here
    low = random_cov(rng, 200, 5)
    assert abs(frechet_distance(np.zeros(200), low, np.zeros(200), low)) < 1e-5 * np.trace(low)
    shift = rng.standard_normal(10)
    assert frechet_distance(mu + shift, s, mu, s) == pytest.approx(shift @ shift, rel=1e-9)
    # symmetric in its two arguments
    s2 = random_cov(rng, 10)
    assert frechet_distance(mu, s, 0 * mu, s2) == pytest.approx(frechet_distance(0 * mu, s2, mu, s), rel=1e-12)


def test_statistics_from_sums_equal_numpy_mean_and_cov(rng):
    features = rng.standard_normal((500, 12)) * rng.uniform(0.1, 5, 12) + rng.uniform(-3, 3, 12)
    stats = FeatureStats.empty(12)
    for batch in np.array_split(features, 7):                           # streamed in uneven batches
        stats.add(batch.astype(np.float32))
    assert stats.n == 500
    f32 = features.astype(np.float32).astype(np.float64)                # what the float32 batches carried
    np.testing.assert_allclose(stats.mean(), f32.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(f32, rowvar=False), rtol=1e-10, atol=1e-12)


def test_merge_and_arrays_round_trip(rng, tmp_path):
    a, b = rng.standard_normal((40, 5)), rng.standard_normal((25, 5)) + 1
    merged = FeatureStats.of(a).merge(FeatureStats.of(b))
    whole = FeatureStats.of(np.concatenate([a, b]))
    np.testing.assert_allclose(merged.feature_sum, whole.feature_sum, rtol=1e-14)
    np.testing.assert_allclose(merged.cov_sum, whole.cov_sum, rtol=1e-14)
    assert merged.n == 65
    np.savez(tmp_path / "s.npz", **merged.arrays())
    again = FeatureStats.from_arrays(np.load(tmp_path / "s.npz"))
    assert again.n == 65 and np.array_equal(again.cov_sum, merged.cov_sum)
    assert again.frechet_distance(whole) == pytest.approx(0, abs=1e-10)


def test_bad_input_names_the_problem(rng):
    with pytest.raises(ValueError, match=r"features must be \[B, 3\], got shape \[4, 2\]"):
        FeatureStats.empty(3).add(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN or infinity"):
        FeatureStats.empty(2).add(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="covariance needs at least 2"):
        FeatureStats.of(np.ones((1, 3))).cov()
    with pytest.raises(ValueError, match="must be float64"):
        FeatureStats(np.zeros(2, np.float32), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"sigma2 has shape \[3, 3\]"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="lack features_num_samples"):
        FeatureStats.from_arrays({"features_sum": np.zeros(2), "features_cov_sum": np.zeros((2, 2))})
