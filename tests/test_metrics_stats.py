"""The metric definitions: Frechet distance, Inception Score, Precision/Recall (ADM's evaluator semantics)."""
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from harness.errors import HarnessError
from harness.config.vocab import normalize_metrics
from harness.metrics.stats import frechet_distance, gaussian_stats, inception_score, manifold_radii, precision_recall
from metrics_helpers import frechet_distance_features
from tolerance import fp32_bound, fp64_bound


def closed_form_diag(mu1, var1, mu2, var2):
    """Frechet distance of diagonal Gaussians: |mu1-mu2|^2 + sum(v1 + v2 - 2 sqrt(v1 v2))."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2.0 * np.sqrt(var1 * var2)))


def frechet_eigh(mu1, s1, mu2, s2):
    """An independent general implementation: Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(ev)))


def test_frechet_matches_closed_form_on_diagonal_gaussians():
    rng = np.random.RandomState(0)
    for d in (1, 5, 64):
        mu1, mu2 = rng.randn(d), rng.randn(d) + 0.5
        var1, var2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
        expect = closed_form_diag(mu1, var1, mu2, var2)
        got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
        assert got == pytest.approx(expect, rel=1e-6)


def test_frechet_of_sampled_features_matches_independent_implementation():
    rng = np.random.RandomState(1)
    d = 16
    a = rng.randn(4000, d) * rng.uniform(0.5, 2.0, d) + 1.0
    b = rng.randn(3000, d) * rng.uniform(0.5, 2.0, d)
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    assert frechet_distance_features(a, b) == pytest.approx(frechet_eigh(mu1, s1, mu2, s2), rel=1e-6)
    # and the sample estimate is near the population closed form (diagonal covariances)
    pop = closed_form_diag(np.full(d, 1.0), np.var(a, 0), np.zeros(d), np.var(b, 0))
    assert frechet_distance_features(a, b) == pytest.approx(pop, rel=0.05)


def test_frechet_of_a_set_against_itself_is_zero():
    rng = np.random.RandomState(2)
    x = rng.randn(500, 32) @ rng.randn(32, 32)
    assert abs(frechet_distance_features(x, x)) < 1e-6 * np.trace(np.cov(x, rowvar=False))


def test_frechet_singular_covariances_stay_finite():
    """Fewer samples than dimensions: the product is singular; ADM's eps path keeps it finite."""
    rng = np.random.RandomState(3)
    a, b = rng.randn(10, 40), rng.randn(10, 40) + 1.0
    fd = frechet_distance_features(a, b)
    assert np.isfinite(fd) and fd > 40 * 0.5  # the mean shift alone contributes ~40


def test_frechet_shape_mismatch_is_a_harness_error():
    with pytest.raises(HarnessError, match="feature space"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(HarnessError):
        gaussian_stats(np.zeros((1, 3)))


def test_inception_score_uniform_is_one_and_confident_is_k():
    assert inception_score(np.zeros((300, 10))) == pytest.approx(1.0, abs=1e-12)
    for k in (2, 10, 1008):
        logits = np.full((3 * k, k), -60.0)
        logits[np.arange(3 * k), np.arange(3 * k) % k] = 60.0
        assert inception_score(logits) == pytest.approx(k, rel=1e-9)


def test_inception_score_averages_over_splits():
    """Two splits, each confident in one class: IS 1 per split; one split holding both: IS 2."""
    logits = np.full((200, 2), -50.0)
    logits[:100, 0] = 50.0
    logits[100:, 1] = 50.0
    assert inception_score(logits, split_size=100) == pytest.approx(1.0, abs=1e-9)
    assert inception_score(logits, split_size=200) == pytest.approx(2.0, rel=1e-9)
    assert inception_score(logits) == pytest.approx(2.0, rel=1e-9)  # default split 5000


def test_precision_recall_identical_and_far_apart():
    rng = np.random.RandomState(4)
    x = rng.randn(300, 8)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)


def test_precision_recall_half_overlap_and_batching_invariance():
    rng = np.random.RandomState(5)
    real = rng.randn(200, 6)
    fake = np.concatenate([real[:100], rng.randn(100, 6) + 500.0])
    p, r = precision_recall(real, fake)
    assert p == pytest.approx(0.5)
    assert 0.5 <= r < 1.0
    assert precision_recall(real, fake, row_batch=7, col_batch=5) == (p, r)


def test_manifold_radii_are_kth_neighbour_squared_distances():
    import torch

    rng = np.random.RandomState(6)
    x = rng.randn(50, 4).astype(np.float32)
    d = cdist(x, x, "sqeuclidean")
    expect = np.sort(d, axis=1)[:, 3]  # the point itself is neighbour 0
    got = manifold_radii(torch.from_numpy(x), k=3, row_batch=16).numpy()
    # float32 |x|^2 + |y|^2 - 2 x.y cancels terms up to 2 max |x|^2 (~29 here): ~16 roundings of that scale,
    # absolute (the radii themselves run 0.5 .. 8); 1 measured
    bound = fp32_bound(16) * 2 * (x.astype(np.float64) ** 2).sum(1).max()
    assert np.abs(got - expect).max() <= bound


def test_normalize_metrics():
    assert normalize_metrics(["recall", "IS", "fid"]) == ["fid", "is", "recall"]
    assert normalize_metrics(["inception_score"]) == ["is"]
    with pytest.raises(HarnessError, match="eval.metrics"):
        normalize_metrics(["kid"])


def test_fid_bootstrap_matches_the_spread_of_independent_draws():
    """The bootstrap standard error over one sample set estimates the standard deviation of FID over
    fresh sample sets from the same distribution; stated tolerance: within a factor of 1.6."""
    from harness.metrics.stats import fid_bootstrap, gaussian_stats

    rng = np.random.default_rng(0)
    d, n = 6, 400
    ref = rng.normal(size=(20000, d))
    mu, sigma = gaussian_stats(ref)
    shift = np.full(d, 0.3)
    fresh = [frechet_distance_features(rng.normal(size=(n, d)) + shift, ref) for _ in range(60)]
    est = fid_bootstrap(rng.normal(size=(n, d)) + shift, mu, sigma, n_boot=60, seed=1)
    assert est["fid_boot"] == 60
    ratio = est["fid_se"] / np.std(fresh, ddof=1)
    assert 1 / 1.6 < ratio < 1.6, ratio


def test_fid_bootstrap_trace_identity_equals_frechet_distance():
    """The eigenvalue shortcut inside fid_bootstrap gives the plain Frechet distance on one set."""
    from harness.metrics import stats

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 5)), rng.normal(size=(300, 5)) @ np.diag([1, 2, 1, 0.5, 1]) + 0.2
    mu, sigma = stats.gaussian_stats(b)
    root = stats._psd_sqrt(sigma)
    m1, s1 = stats.gaussian_stats(a)
    eig = np.linalg.eigvalsh(root @ s1 @ root)
    fast = (m1 - mu) @ (m1 - mu) + np.trace(s1) + np.trace(sigma) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()
    # float64, the distance (~1.5) is what is left of traces ~12: rounding at the traces' scale, with room for
    # the matrix square root's and eigensolver's iterations (1024 roundings; 1.3 measured)
    bound = fp64_bound(1024) * (np.trace(s1) + np.trace(sigma))
    assert abs(fast - stats.frechet_distance(m1, s1, mu, sigma)) < bound
