"""The numbers themselves: Frechet distance (FID, sFID), Inception Score, Precision and Recall.

Each follows the definition in ADM's evaluator (guided-diffusion `evaluations/evaluator.py`), which
the DiT paper used for every number it reports:
- Frechet distance between Gaussians fitted to two feature sets, in float64, with an `eps * I`
  offset when the covariance product is near singular and a check on the imaginary part;
- Inception Score over splits of 5,000 predictions;
- Precision and Recall of Kynkaanniemi et al. (2019): k-nearest-neighbour balls (k = 3, squared
  Euclidean distances, the point itself counted as its own 0th neighbour), computed in batches.

FID's uncertainty is a bootstrap over the generated samples (the reference is fixed): `fid_bootstrap`, one
FID's standard error se; `fid_difference`, the standard error se_paired of FID_a - FID_b for two PAIRED sets
(sample i of both began from the same noise with the same label: the records prove it, harness.study.pairing),
each resample drawing the same indices from both. The rule that uses them, fixed before any check ran: two FIDs
differ -- "resolved" -- when |FID_a - FID_b| > RESOLVE_Z * se_paired (RESOLVE_Z = 1.645, two-sided 90%) where
the two sets are provably paired and both have their features stored, else when |FID_a - FID_b| > RESOLVE_Z *
sqrt(se_a^2 + se_b^2) (harness.study.analysis.compare). Shared noise makes the two FIDs move together, so
se_paired is the smaller; tests/test_paired_fid.py holds its 90% interval's coverage to 90% within a binomial
tolerance.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from scipy import linalg

from harness.errors import HarnessError

log = logging.getLogger(__name__)

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURHOOD = 3


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), in float64, of features (N, D)."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise HarnessError(f"need at least 2 feature vectors of shape (N, D), got {feats.shape}; "
                           "evaluate more samples")
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))  # D = 1: (1, 1), not a scalar


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's deprecation notes and ill-conditioning chatter
        out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64. When the matrix
    square root is not finite, `eps` is added to both diagonals (as ADM does); a square root whose
    diagonal has an imaginary part above 1e-3 is an error, a smaller one is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise HarnessError(f"feature statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, "
                           f"sigma {sigma1.shape} vs {sigma2.shape}; the reference was computed in "
                           "another feature space -- recompute it with the same --features")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        log.warning("Frechet distance: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise HarnessError(
                f"Frechet distance: the covariance square root has an imaginary component "
                f"{np.max(np.abs(covmean.imag)):.3g}; the feature statistics are degenerate -- "
                "evaluate more samples (at least as many as feature dimensions)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Inception Score of class logits (N, K): mean over splits of exp(E_x KL(p(y|x) || p(y))).

    Softmax in float64; 0 * log 0 counts as 0. The last split may be shorter (as in ADM).
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise HarnessError(f"inception_score needs logits of shape (N, K), got {tuple(logits.shape)}")
    scores = []
    for start in range(0, logits.shape[0], split_size):
        logp = torch.log_softmax(logits[start:start + split_size], dim=1)
        p = logp.exp()
        log_marginal = torch.log(p.mean(dim=0, keepdim=True))
        kl = torch.where(p > 0, p * (logp - log_marginal), torch.zeros_like(p)).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (Na, Nb), clamped at 0."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURHOOD, row_batch: int = 1024) -> torch.Tensor:
    """Squared distance of each feature (N, D) to its k-th nearest neighbour (itself = 0th) -> (N,)."""
    n = features.shape[0]
    if n <= k:
        raise HarnessError(f"precision/recall need more than k={k} feature vectors, got {n}; "
                           "evaluate more samples")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for start in range(0, n, row_batch):
        d = _sq_distances(features[start:start + row_batch], features)
        radii[start:start + row_batch] = torch.kthvalue(d, k + 1, dim=1).values
    return radii


def _within(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
            row_batch: int, col_batch: int) -> torch.Tensor:
    """For each point (Np, D): does it lie in some ball (centre (Nc, D), squared radius (Nc,))?"""
    inside = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    for i in range(0, points.shape[0], row_batch):
        rows = points[i:i + row_batch]
        for j in range(0, centres.shape[0], col_batch):
            d = _sq_distances(rows, centres[j:j + col_batch])
            inside[i:i + row_batch] |= (d <= radii[None, j:j + col_batch]).any(dim=1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURHOOD,
                     row_batch: int = 1024, col_batch: int = 8192,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al.) of fake (Nf, D) against real (Nr, D).

    Precision: fraction of fake features inside the real manifold (union of k-NN balls);
    recall: fraction of real features inside the fake manifold. float32, batched.
    """
    r = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise HarnessError(f"precision/recall need (N, D) features of equal D, got {tuple(r.shape)} "
                           f"and {tuple(f.shape)}; recompute the reference in the same feature space")
    r_radii = manifold_radii(r, k, row_batch)
    f_radii = manifold_radii(f, k, row_batch)
    precision = _within(f, r, r_radii, row_batch, col_batch).double().mean().item()
    recall = _within(r, f, f_radii, row_batch, col_batch).double().mean().item()
    return float(precision), float(recall)


FID_BOOTSTRAP = 20  # resamples of the generated features behind each recorded FID standard error


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (D, D) through its eigen-decomposition."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _resampled_fid(feats: np.ndarray, idx: np.ndarray, mu_ref: np.ndarray, root: np.ndarray, base: float) -> float:
    """FID of the rows `idx` of feats (N, D) against N(mu_ref, root^2), base = Tr(root^2): Tr((S1 S2)^(1/2)) is
    the sum of sqrt(eigenvalues of R S1 R) with R = S2^(1/2), computed once by the caller."""
    mu, sigma = gaussian_stats(feats[idx])
    eig = np.linalg.eigvalsh(root @ sigma @ root)
    diff = mu - mu_ref
    return float(diff @ diff + np.trace(sigma) + base - 2.0 * np.sqrt(np.clip(eig, 0, None)).sum())


def fid_bootstrap(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                  n_boot: int = FID_BOOTSTRAP, seed: int = 0) -> dict:
    """FID's sampling noise: the Frechet distance of resamples (with replacement) of the generated
    features (N, D) against the fixed reference statistics. Returns {"fid_se": the standard deviation
    of the resampled FIDs, "fid_boot": n_boot}. Only the spread is meant to be used: a resample
    repeats samples, which biases its FID upward, so the level of the resampled values is not FID's.
    """
    feats = np.asarray(features, np.float64)
    if n_boot < 2 or feats.ndim != 2 or feats.shape[0] < 2:
        return {"fid_se": None, "fid_boot": 0}
    mu_ref, sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
    root, base = _psd_sqrt(sigma_ref), float(np.trace(sigma_ref))
    rng = np.random.default_rng(seed)
    n = feats.shape[0]
    values = [_resampled_fid(feats, rng.integers(0, n, n), mu_ref, root, base) for _ in range(n_boot)]
    return {"fid_se": float(np.std(values, ddof=1)), "fid_boot": int(n_boot)}


def fid_difference(features_a: np.ndarray, features_b: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                   n_boot: int = FID_BOOTSTRAP, seed: int = 0) -> dict:
    """FID_a - FID_b of two paired feature sets (N, D) each -- row i of both from the same noise and label, which
    the caller has proved (harness.study.pairing) -- and its standard error: the standard deviation of the
    difference over n_boot resamples that draw the SAME N indices (with replacement) from both sets.
    Returns {"fid_diff", "fid_diff_se" (None when n_boot < 2), "fid_diff_boot"}; see the module docstring's rule."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] < 2:
        raise HarnessError(f"paired FID features must be two (N, D) sets of one shape, got {a.shape} and {b.shape}; "
                           "only sets whose sample i shares noise and label can be paired")
    mu_ref, sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
    diff = (frechet_distance(*gaussian_stats(a), mu_ref, sigma_ref)
            - frechet_distance(*gaussian_stats(b), mu_ref, sigma_ref))
    if n_boot < 2:
        return {"fid_diff": diff, "fid_diff_se": None, "fid_diff_boot": 0}
    root, base = _psd_sqrt(sigma_ref), float(np.trace(sigma_ref))
    rng = np.random.default_rng(seed)
    n = a.shape[0]
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        values.append(_resampled_fid(a, idx, mu_ref, root, base) - _resampled_fid(b, idx, mu_ref, root, base))
    return {"fid_diff": diff, "fid_diff_se": float(np.std(values, ddof=1)), "fid_diff_boot": int(n_boot)}
