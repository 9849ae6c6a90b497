"""Edges of the metric definitions a study relies on without seeing them (issue 16, from surviving
mutants): float64 arithmetic whatever the input dtype, ADM's eps fallback when the matrix square
root is not finite, the imaginary-part check, the shape checks, and the smallest valid inputs."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import linalg

from harness.errors import HarnessError
from harness.metrics import stats
from harness.metrics.stats import frechet_distance, gaussian_stats, inception_score
from metrics_helpers import frechet_distance_features


def test_float32_features_are_measured_in_float64():
    """A large common offset and a small spread: float32 arithmetic would visibly change the FID."""
    rng = np.random.default_rng(0)
    a = (1000.0 + 0.01 * rng.standard_normal((200, 4))).astype(np.float32)
    b = (1000.0 + 0.01 * rng.standard_normal((200, 4)) + 0.003).astype(np.float32)
    want = frechet_distance_features(a.astype(np.float64), b.astype(np.float64))
    assert frechet_distance_features(a, b) == pytest.approx(want, rel=1e-9)
    mu1, s1 = gaussian_stats(a.astype(np.float64))
    mu2, s2 = gaussian_stats(b.astype(np.float64))
    args32 = [x.astype(np.float32) for x in (mu1, s1, mu2, s2)]
    want32 = frechet_distance(*[x.astype(np.float64) for x in args32])
    assert frechet_distance(*args32) == pytest.approx(want32, rel=1e-9)
    mu, cov = gaussian_stats(a)
    assert mu.dtype == np.float64 and cov.dtype == np.float64


def test_gaussian_stats_needs_two_vectors_and_says_so():
    mu, cov = gaussian_stats(np.array([[0.0, 1.0], [2.0, 3.0]]))
    np.testing.assert_allclose(mu, [1.0, 2.0])
    np.testing.assert_allclose(cov, [[2.0, 2.0], [2.0, 2.0]])  # unbiased: divides by N - 1
    for bad in (np.zeros((1, 3)), np.zeros(3)):
        with pytest.raises(HarnessError, match="; evaluate more samples$"):
            gaussian_stats(bad)


def test_eps_fallback_when_the_square_root_is_not_finite(monkeypatch, caplog):
    """ADM's path: a non-finite sqrt(S1 S2) is retried as sqrt((S1 + eps I)(S2 + eps I))."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    s1, s2 = x @ x.T, y @ y.T + np.diag([0.5, 1.0, 2.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.zeros(3)
    calls = []

    def sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else linalg.sqrtm(a)

    monkeypatch.setattr(stats, "_sqrtm", sqrtm)
    eps = 1e-6
    with caplog.at_level(logging.WARNING, logger="harness.metrics.stats"):
        got = frechet_distance(mu1, s1, mu2, s2)
    assert len(calls) == 2
    off = np.eye(3) * eps
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off), rtol=1e-12)
    want = 5.0 + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm((s1 + off) @ (s2 + off)).real)
    assert got == pytest.approx(want, rel=1e-12)
    assert [r.getMessage() for r in caplog.records] == [
        "Frechet distance: singular covariance product; adding 1e-06 to the diagonals"]
    calls.clear()
    frechet_distance(mu1, s1, mu2, s2, eps=0.5)  # the eps argument is the one added
    np.testing.assert_allclose(calls[1], (s1 + 0.5 * np.eye(3)) @ (s2 + 0.5 * np.eye(3)), rtol=1e-12)


def test_imaginary_part_small_is_dropped_large_is_an_error(monkeypatch):
    s = np.diag([1.0, 4.0])
    root = np.diag([1.0, 2.0])
    monkeypatch.setattr(stats, "_sqrtm", lambda a: root + 1e-5j * np.ones((2, 2)))
    assert frechet_distance(np.zeros(2), s, np.zeros(2), s) == pytest.approx(5 + 5 - 2 * 3, abs=1e-12)
    monkeypatch.setattr(stats, "_sqrtm", lambda a: root + 1e-2j * np.eye(2))
    with pytest.raises(HarnessError, match=r"imaginary component 0.01.*degenerate -- evaluate more samples \(at least as many as feature dimensions\)$"):
        frechet_distance(np.zeros(2), s, np.zeros(2), s)


@pytest.mark.parametrize("mu1,s1,mu2,s2", [
    (np.zeros(3), np.eye(3), np.zeros(3), np.eye(4)),   # covariances disagree
    (np.zeros(3), np.eye(3), np.zeros(4), np.eye(3)),   # means disagree
    (np.zeros(3), np.eye(2), np.zeros(3), np.eye(2)),   # covariance not (D, D)
])
def test_every_shape_disagreement_is_a_harness_error(mu1, s1, mu2, s2):
    with pytest.raises(HarnessError, match="another feature space -- recompute it with the same --features$"):
        frechet_distance(mu1, s1, mu2, s2)


def test_inception_score_in_float64_and_its_input_checks():
    rng = np.random.default_rng(2)
    logits = (40.0 * rng.standard_normal((50, 7))).astype(np.float32)
    assert inception_score(logits) == pytest.approx(inception_score(logits.astype(np.float64)), rel=1e-12)
    for bad in (np.zeros(5), np.zeros((0, 4))):
        with pytest.raises(HarnessError, match=r"shape \(N, K\)"):
            inception_score(bad)


def test_inception_score_edges():
    """One prediction is a valid input (IS 1); a class with probability exactly 0 counts 0 * log 0 = 0;
    splits run over predictions, not classes."""
    assert inception_score(np.zeros((1, 5))) == pytest.approx(1.0, abs=1e-12)
    logits = np.array([[0.0, -1e4, -1e4], [-1e4, 0.0, -1e4]])  # softmax underflows to exact zeros
    assert inception_score(logits) == pytest.approx(2.0, rel=1e-12)
    rng = np.random.default_rng(3)
    many = rng.standard_normal((12, 3)) * 3
    per_split = [inception_score(many[i:i + 2]) for i in range(0, 12, 2)]
    assert inception_score(many, split_size=2) == pytest.approx(np.mean(per_split), rel=1e-12)


def test_precision_recall_ball_boundaries_and_the_smallest_set():
    """A point exactly on a k-NN ball's boundary is inside it (<=, as ADM); k + 1 points are enough."""
    import torch

    from harness.metrics.stats import manifold_radii, precision_recall

    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k = 3: every radius is the 3rd-neighbour distance
    radii = manifold_radii(torch.as_tensor(real, dtype=torch.float32))
    np.testing.assert_allclose(radii.numpy(), [9.0, 4.0, 4.0, 9.0])
    # -3 and 6 lie exactly on the boundaries of the balls around 0 and 3 (squared radius 9), 5 inside, 7 out
    fake = np.array([[-3.0], [5.0], [6.0], [7.0]])
    precision, _ = precision_recall(real, fake)
    assert precision == pytest.approx(0.75)
    with pytest.raises(HarnessError, match="; evaluate more samples$"):
        manifold_radii(torch.zeros(3, 2))


@pytest.mark.parametrize("real,fake", [(np.zeros((5, 2)), np.zeros(5)), (np.zeros(5), np.zeros((5, 2))),
                                       (np.zeros((5, 2)), np.zeros((5, 3)))])
def test_precision_recall_shape_disagreement_is_a_harness_error(real, fake):
    from harness.metrics.stats import precision_recall

    with pytest.raises(HarnessError, match=r"got \(5.*\) and \(5.*\); recompute the reference"):
        precision_recall(real, fake)


# ----------------------------------------------------------------------------- FID's bootstrap (fid_se)
def _fid_by_definition(feats, mu_ref, sigma_ref):
    mu, sigma = feats.mean(axis=0), np.cov(feats, rowvar=False)
    covmean = linalg.sqrtm(sigma @ sigma_ref).real
    return float((mu - mu_ref) @ (mu - mu_ref) + np.trace(sigma) + np.trace(sigma_ref) - 2 * np.trace(covmean))


def test_fid_bootstrap_is_the_spread_of_resampled_fids():
    """fid_se = the ddof-1 standard deviation of FIDs of resamples drawn with replacement by
    default_rng(seed).integers(0, N, N), each against the fixed reference; in float64 whatever the
    inputs' dtype; seed 0 by default."""
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(30, 3)).astype(np.float32)
    ref = rng.normal(size=(200, 3)) * [1.0, 2.0, 0.5] + 0.3
    mu_ref, sigma_ref = ref.mean(axis=0), np.cov(ref, rowvar=False)
    draws = np.random.default_rng(7)
    want = [_fid_by_definition(feats.astype(np.float64)[draws.integers(0, 30, 30)], mu_ref, sigma_ref) for _ in range(5)]
    mu32, sigma32 = mu_ref.astype(np.float32), sigma_ref.astype(np.float32)
    got = stats.fid_bootstrap(feats, mu32, sigma32, n_boot=5, seed=7)
    draws = np.random.default_rng(7)   # float32 inputs are computed on in float64: the rounded values, exactly
    want32 = [_fid_by_definition(feats.astype(np.float64)[draws.integers(0, 30, 30)], mu32.astype(np.float64),
                                 sigma32.astype(np.float64)) for _ in range(5)]
    assert got["fid_boot"] == 5 and got["fid_se"] > 0
    assert got["fid_se"] == pytest.approx(float(np.std(want32, ddof=1)), rel=1e-9)
    exact = stats.fid_bootstrap(feats, mu_ref, sigma_ref, n_boot=5, seed=7)["fid_se"]
    assert exact == pytest.approx(float(np.std(want, ddof=1)), rel=1e-9)
    assert stats.fid_bootstrap(feats, mu_ref, sigma_ref, n_boot=5) == stats.fid_bootstrap(feats, mu_ref, sigma_ref,
                                                                                          n_boot=5, seed=0)
    assert stats.fid_bootstrap(feats, mu_ref, sigma_ref, n_boot=5, seed=1) != stats.fid_bootstrap(
        feats, mu_ref, sigma_ref, n_boot=5, seed=0)


def test_fid_bootstrap_needs_two_resamples_of_two_rows_and_says_so_with_none():
    rng = np.random.default_rng(0)
    mu, sigma = np.zeros(3), np.eye(3)
    for feats, n_boot in ((rng.normal(size=(10, 3)), 1), (rng.normal(size=(1, 3)), 5), (rng.normal(size=10), 5)):
        assert stats.fid_bootstrap(feats, mu, sigma, n_boot=n_boot) == {"fid_se": None, "fid_boot": 0}
    assert stats.fid_bootstrap(rng.normal(size=(2, 3)), mu, sigma, n_boot=2)["fid_boot"] == 2   # the smallest case
    one_dim = stats.fid_bootstrap(rng.normal(size=(8, 1)), np.zeros(1), np.eye(1), n_boot=3)
    assert one_dim["fid_boot"] == 3 and np.isfinite(one_dim["fid_se"])


def test_psd_square_root_clips_round_off_negatives():
    root = stats._psd_sqrt(np.diag([4.0, 1.0, -1e-12]))
    assert np.allclose(root, np.diag([2.0, 1.0, 0.0])) and np.isfinite(root).all()


def test_fid_bootstrap_is_finite_when_there_are_fewer_samples_than_dimensions():
    """Fewer samples than feature dimensions (1,000 samples in Inception's 2,048): the covariances are
    singular, round-off makes some eigenvalues of R S R slightly negative, and those count as zero."""
    rng = np.random.default_rng(0)
    feats, ref = rng.normal(size=(6, 5)), rng.normal(size=(3, 5))
    got = stats.fid_bootstrap(feats, ref.mean(axis=0), np.cov(ref, rowvar=False), n_boot=20)
    assert np.isfinite(got["fid_se"]) and got["fid_se"] > 0
