"""The compute-optimal (isoFLOP) view of a sweep evaluated at several checkpoints: FID at fixed
training-compute budgets, the best model per budget, and how its Gflops grow with the budget."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.study.analysis import curves, interp
from harness.study.laws import LEVEL
from harness.study.results import main_conditioning


@dataclass
class ComputeOptimal:
    """FID at fixed training-compute budgets across models, read along each model's curve (never past
    its last checkpoint), the best model per budget, and log10(optimal Gflops) = c + slope * log10(budget)."""

    budgets: np.ndarray            # (B,) training compute, Gflops
    models: list[str]              # curve labels, by Gflops
    gflops: np.ndarray             # (M,)
    fid: np.ndarray                # (M, B), NaN where a model's curve does not reach the budget
    best: list[str]                # (B,)
    slope: float
    intercept: float
    slope_ci: tuple[float, float]
    level: float
    why_not: str = ""              # non-empty: the slope is not identified

    def best_gflops(self) -> np.ndarray:
        return np.array([self.gflops[self.models.index(b)] for b in self.best])


def _best_per_budget(fid: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Index of the lowest FID per budget among rows `keep` (M,) bool; -1 where none is defined."""
    masked = np.where(keep[:, None] & np.isfinite(fid), fid, np.inf)
    idx = np.argmin(masked, axis=0)
    return np.where(np.isfinite(masked.min(axis=0)), idx, -1)


def compute_optimal(frame: pd.DataFrame, n_budgets: int = 8, n_boot: int = 500, level: float = LEVEL,
                    seed: int = 0) -> ComputeOptimal | None:
    """The compute-optimal view of a sweep evaluated at several checkpoints; None when fewer than 2
    models have 2 or more checkpoints. The slope's interval resamples models (with replacement)."""
    main = frame[frame["conditioning"] == main_conditioning(frame)]
    cv = {k: v for k, v in curves(main, "fid", "train_compute").items() if len(v[0]) >= 2}
    if len(cv) < 2:
        return None
    g = main.groupby("model")["gflops"].mean()
    models = sorted(cv, key=lambda k: g.get(k, np.nan))
    gflops = np.array([g.get(k, np.nan) for k in models], float)
    lo, hi = min(cv[k][0][0] for k in models), max(cv[k][0][-1] for k in models)
    grid = np.geomspace(lo, hi, 4 * n_budgets)
    fid = np.array([[interp(*cv[k], b) for b in grid] for k in models])
    grid_ok = np.isfinite(fid).sum(axis=0) >= 2  # budgets where at least two models can be compared
    if grid_ok.sum() < 2:
        return None
    budgets = np.geomspace(grid[grid_ok].min(), grid[grid_ok].max(), n_budgets)
    fid = np.array([[interp(*cv[k], b) for b in budgets] for k in models])
    best_idx = _best_per_budget(fid, np.ones(len(models), bool))
    best = [models[i] for i in best_idx]

    def slope_of(idx: np.ndarray) -> tuple[float, float]:
        ok = idx >= 0
        if ok.sum() < 2 or len(set(idx[ok])) < 2:
            return 0.0, float(np.log10(gflops[idx[ok]].mean())) if ok.any() else float("nan")
        s, c = np.polyfit(np.log10(budgets[ok]), np.log10(gflops[idx[ok]]), 1)
        return float(s), float(c)

    slope, intercept = slope_of(best_idx)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        keep = np.zeros(len(models), bool)
        keep[rng.integers(0, len(models), len(models))] = True
        boot.append(slope_of(_best_per_budget(fid, keep))[0])
    ci = tuple(float(v) for v in np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]))
    why = ""
    if len(set(best)) < 2:
        why = f"the same model ({best[0]}) is best at every budget"
    return ComputeOptimal(budgets, models, gflops, fid, best, slope, intercept, ci, level, why)
