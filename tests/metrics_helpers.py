"""Test-only helpers of the metrics: the Frechet distance of two raw feature sets."""
from __future__ import annotations

import numpy as np

from harness.metrics.stats import frechet_distance, gaussian_stats


def frechet_distance_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*gaussian_stats(feats1), *gaussian_stats(feats2))
