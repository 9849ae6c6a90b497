"""Evaluation: FID, sFID, Inception Score, Precision and Recall, defined as ADM's evaluator defines them.

    extractor = get_feature_extractor("digits")            # or "inception", weights=PATH
    reference = load_reference("digits", extractor)         # or an ADM npz, or an image folder
    compute_metrics(images_uint8_NHWC, reference, extractor)
    -> {"fid": .., "sfid": .., "inception_score": .., "precision": .., "recall": ..,
        "feature_space": "digits", "num_samples": N}

Every number carries its feature space; numbers from different spaces are never comparable.
The metric and feature-space names live in `harness.config.vocab` (torch-free: the spec validates
against them; import them from there); the extractors and statistics load on first use.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable

from harness.config.vocab import FEATURE_SPACES, METRIC_KEYS, METRICS, normalize_metrics
from harness.errors import HarnessError

if TYPE_CHECKING:
    import numpy as np

    from harness.metrics.features import FeatureExtractor, Features
    from harness.metrics.reference import ReferenceStats

log = logging.getLogger(__name__)

__all__ = ["compute_metrics", "metrics_from_features", "load_reference", "get_feature_extractor", "FeatureExtractor",
           "Features", "ReferenceStats"]

_LAZY = {"FeatureExtractor": "features", "Features": "features", "check_images": "features",
         "ReferenceStats": "reference", "load_reference": "reference"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # torch-heavy: imported on first use
        import importlib

        return getattr(importlib.import_module(f"harness.metrics.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'harness.metrics' has no attribute {name!r}")

_EXTRACTORS: dict[tuple, FeatureExtractor] = {}


def get_feature_extractor(name: str, **kw) -> FeatureExtractor:
    """The feature space `name` ('inception' or 'digits'), built once per process and reused.

    Keywords: device (default cuda if available); for inception, weights (or inception_weights):
    a local FID weights file (default: $HARNESS_INCEPTION_WEIGHTS, then the torch hub cache).
    """
    weights = kw.pop("weights", None) or kw.pop("inception_weights", None)
    device = kw.pop("device", None)
    if kw:
        raise TypeError(f"get_feature_extractor: unexpected arguments {sorted(kw)}")
    key = (name, str(weights), str(device))
    if key in _EXTRACTORS:
        return _EXTRACTORS[key]
    if name == "inception":
        from harness.metrics.inception import InceptionFeatures  # torch: the names import without it
        extractor: FeatureExtractor = InceptionFeatures(weights=weights, device=device)
    elif name == "digits":
        from harness.metrics.digits import DigitsFeatures  # torch: the names import without it
        extractor = DigitsFeatures(device=device)
    else:
        raise HarnessError(f"unknown feature space {name!r} (--features / eval.features); "
                           f"choose from {', '.join(FEATURE_SPACES)}")
    _EXTRACTORS[key] = extractor
    return extractor


def compute_metrics(images: np.ndarray, reference: ReferenceStats, extractor: FeatureExtractor,
                    metrics: Iterable[str] = METRICS, batch_size: int = 100) -> dict:
    """The requested metrics of samples uint8 (N, H, W, 3) against `reference`, in `extractor`'s space.

    Returns {fid, sfid, inception_score, precision, recall (None when not requested),
    fid_se (FID's bootstrap standard error over the samples, harness.metrics.stats.fid_bootstrap),
    feature_space, num_samples}.
    """
    from harness.metrics.features import check_images  # torch: the names import without it

    wanted = normalize_metrics(metrics)
    _check_space(reference, extractor)
    images = check_images(images, "samples")
    return metrics_from_features(extractor.extract(images, batch_size), reference, extractor, wanted)


def metrics_from_features(feats: Features, reference: ReferenceStats, extractor: FeatureExtractor,
                          metrics: Iterable[str] = METRICS) -> dict:
    """compute_metrics from features already extracted (e.g. on every rank, gathered to one)."""
    # torch: the names import without it
    from harness.metrics.stats import fid_bootstrap, frechet_distance, gaussian_stats, inception_score, precision_recall

    wanted = normalize_metrics(metrics)
    _check_space(reference, extractor)
    out: dict = {v: None for v in METRIC_KEYS.values()}
    if "fid" in wanted:
        out["fid"] = frechet_distance(*gaussian_stats(feats.pool), reference.mu, reference.sigma)
        out.update(fid_bootstrap(feats.pool, reference.mu, reference.sigma))
    if "sfid" in wanted:
        out["sfid"] = frechet_distance(*gaussian_stats(feats.spatial), reference.mu_s, reference.sigma_s)
    if "is" in wanted:
        out["inception_score"] = inception_score(feats.logits)
    if "precision" in wanted or "recall" in wanted:
        precision, recall = precision_recall(reference.pool_features(), feats.pool, device=extractor.device)
        out["precision"] = precision if "precision" in wanted else None
        out["recall"] = recall if "recall" in wanted else None
    out["feature_space"] = extractor.name
    out["num_samples"] = len(feats)
    return out


def _check_space(reference: ReferenceStats, extractor: FeatureExtractor) -> None:
    if reference.feature_identity != extractor.identity:
        raise HarnessError(f"reference {reference.source} was computed in feature space "
                           f"{reference.feature_identity}, not {extractor.identity}; load it with the same extractor")
