"""How far FID moves when its features are stored as float16 (harness.metrics.features.stored_features), against
FID's own bootstrap standard error. Prints one JSON line per measurement; the README quotes them.

  python scripts/float16_features.py [--synthetic-n 50000] [--no-inception]

1. inception-random: the FID Inception architecture (random weights: the real ones cannot be fetched offline) on
   the 1,797 real digits (reference) and on 1,000 digits with Gaussian pixel noise (the "generated" set): 2,048-d.
2. synthetic: N x 2,048 post-ReLU Gaussian features with a decaying spectrum, a reference and a perturbed
   generator, at FID-50K's N (the error from float16 does not shrink with N; the standard error does).
"""
from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

from harness.data.datasets import load_digits
from harness.metrics import get_feature_extractor, load_reference
from harness.metrics.features import stored_features
from harness.metrics.inception import write_random_inception_weights
from harness.metrics.stats import fid_bootstrap, frechet_distance, gaussian_stats


def measure(name: str, gen: np.ndarray, mu: np.ndarray, sigma: np.ndarray, n_boot: int) -> dict:
    """FID from float32 features and from their float16 copy; the bootstrap standard error over n_boot resamples."""
    half = stored_features(gen, "inception")
    assert half.dtype == np.float16
    fid32 = frechet_distance(*gaussian_stats(gen.astype(np.float32)), mu, sigma)
    fid16 = frechet_distance(*gaussian_stats(half), mu, sigma)
    se = fid_bootstrap(gen, mu, sigma, n_boot=n_boot)["fid_se"]
    return {"set": name, "n": len(gen), "d": gen.shape[1], "fid_float32": fid32, "fid_float16": fid16,
            "abs_diff": abs(fid16 - fid32), "fid_se": se, "diff_over_se": abs(fid16 - fid32) / se, "n_boot": n_boot}


def inception_random() -> dict:
    weights = write_random_inception_weights(tempfile.mkdtemp() + "/inception-random.pth", seed=0)
    extractor = get_feature_extractor("inception", weights=str(weights), device="cpu")
    ref = load_reference("digits", extractor, image_size=8, batch_size=100)
    gray, _ = load_digits()
    rng = np.random.default_rng(0)
    noisy = np.clip(gray[:1000].astype(np.float64) + rng.normal(0, 40, (1000, 8, 8)), 0, 255).astype(np.uint8)
    gen = extractor.extract(np.repeat(noisy[..., None], 3, axis=-1), 100).pool.astype(np.float64)
    return measure("inception-random digits", gen, ref.mu, ref.sigma, n_boot=20)


def synthetic(n: int, d: int = 2048, n_boot: int = 5) -> dict:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    mix = (q * np.arange(1, d + 1) ** -0.5) @ q.T * 4.0            # covariance with a decaying spectrum

    def draw(shift: float) -> np.ndarray:
        return np.maximum(rng.standard_normal((n, d)) @ mix + 0.3 + shift, 0.0)   # post-ReLU, like pool3

    mu, sigma = gaussian_stats(draw(0.0))
    return measure("synthetic post-ReLU", draw(0.02), mu, sigma, n_boot=n_boot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic-n", type=int, default=50000)
    parser.add_argument("--no-inception", action="store_true", help="skip the (slow on a CPU) Inception part")
    args = parser.parse_args()
    if not args.no_inception:
        print(json.dumps(inception_random()), flush=True)
    print(json.dumps(synthetic(args.synthetic_n)), flush=True)


if __name__ == "__main__":
    main()
