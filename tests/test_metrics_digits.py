"""The embedded digits feature space: an honest classifier, and metrics that order real, blurred and noise."""
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from harness.data.datasets import load_digits
from harness.metrics import compute_metrics, get_feature_extractor, load_reference
from harness.metrics.digits import DIGITS_CONFIG, _split, load_digits_classifier, to_input
from metrics_helpers import frechet_distance_features


def rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits()
    perm = np.random.RandomState(0).permutation(len(images))
    half = len(images) // 2
    return rgb(images), labels, perm[:half], perm[half:]


@pytest.mark.slow  # trains the classifier (5-20 s on 2 shared cores); later tests reuse the cache
def test_classifier_reaches_95_percent_on_its_own_heldout_split():
    net, acc, _ = load_digits_classifier()
    images, labels = load_digits()
    train_idx, held_idx = _split(labels, DIGITS_CONFIG["holdout_fraction"], DIGITS_CONFIG["seed"])
    assert len(set(train_idx) & set(held_idx)) == 0 and len(held_idx) > 300
    with torch.no_grad():
        pred = net(to_input(torch.from_numpy(images[held_idx])))[2].argmax(1).numpy()
    recomputed = float((pred == labels[held_idx]).mean())
    assert recomputed == pytest.approx(acc, abs=1e-6)
    assert recomputed >= 0.95


def test_features_have_the_documented_shapes_and_accept_other_sizes(digits):
    images, _, a, _ = digits
    ex = get_feature_extractor("digits", device="cpu")
    f = ex.extract(images[a[:20]], batch_size=7)
    assert f.pool.shape == (20, 32) and f.spatial.shape == (20, 128) and f.logits.shape == (20, 10)
    big = np.repeat(np.repeat(images[a[:20]], 2, axis=1), 2, axis=2)  # 16x16
    g = ex.extract(big)
    assert g.pool.shape == (20, 32) and np.isfinite(g.pool).all()
    # the resized digits are still recognised
    assert (g.logits.argmax(1) == f.logits.argmax(1)).mean() >= 0.8


def test_fid_orders_real_blurred_and_noise_with_margins(digits):
    images, _, a, b = digits
    ex = get_feature_extractor("digits", device="cpu")
    rng = np.random.RandomState(1)
    noise = rng.randint(0, 256, images[b].shape).astype(np.uint8)
    blurred = np.clip(np.rint(gaussian_filter(images[b].astype(float), sigma=(0, 1, 1, 0))), 0, 255).astype(np.uint8)
    fa, fb, fn, fbl = (ex.extract(x) for x in (images[a], images[b], noise, blurred))
    fid_real = frechet_distance_features(fa.pool, fb.pool)
    fid_noise = frechet_distance_features(fa.pool, fn.pool)
    fid_blur = frechet_distance_features(fa.pool, fbl.pool)
    assert fid_real * 50 < fid_noise, (fid_real, fid_noise)
    assert fid_real * 10 < fid_blur, (fid_real, fid_blur)
    sfid_real = frechet_distance_features(fa.spatial, fb.spatial)
    assert sfid_real * 10 < frechet_distance_features(fa.spatial, fbl.spatial)


def test_compute_metrics_against_the_digits_reference(digits):
    images, _, _, b = digits
    ex = get_feature_extractor("digits", device="cpu")
    ref = load_reference("digits", ex)
    assert ref.num_images == 1797 and ref.resolution == 8 and ref.feature_space == "digits"
    real = compute_metrics(images[b], ref, ex)
    noise = compute_metrics(np.random.RandomState(2).randint(0, 256, images[b].shape).astype(np.uint8), ref, ex)
    assert real["feature_space"] == "digits" and real["num_samples"] == len(b)
    assert real["fid"] * 50 < noise["fid"]
    assert real["inception_score"] > 8.0 > noise["inception_score"]  # 10 balanced classes vs confusion
    assert real["precision"] > 0.9 and real["recall"] > 0.9
    assert noise["precision"] < 0.05 and noise["recall"] < 0.05
    only = compute_metrics(images[b], ref, ex, metrics=["fid"])
    assert only["fid"] == pytest.approx(real["fid"]) and only["sfid"] is None and only["precision"] is None
    # a second load hits the cache and gives the same statistics
    again = load_reference("digits", ex)
    np.testing.assert_allclose(again.sigma, ref.sigma)
    np.testing.assert_allclose(again.pool_features(), ref.pool_features())
