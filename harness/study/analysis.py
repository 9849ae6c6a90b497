"""Fits and statistics of a sweep: correlations, power laws, the compute frontier, sampling compute.

Inputs are the tidy DataFrame of harness.study.results (one row per evaluation record) or plain arrays.
Compute axes are in Gflops: `gflops` (one forward pass, one image), `train_compute`
(gflops x batch x steps x 3) and `sampling_compute` (gflops x sampling steps, x2 with guidance).
Bootstrap intervals resample runs (all points of a run together), never single points.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import pandas as pd
from scipy import optimize, stats

from harness.errors import HarnessError
from harness.study import laws
from harness.study.results import METRICS, PAIRING_COLUMNS, default_setting

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- selection
def choose_step(frame: pd.DataFrame, step: int | None = None) -> int:
    """`step` if given (must exist), else the largest step that the most runs were evaluated at."""
    steps = frame.groupby("step")["run_id"].nunique()
    if steps.empty:
        raise HarnessError("no evaluated steps in the results; run the sweep's evaluations first")
    if step is not None:
        if step not in steps.index:
            raise HarnessError(f"step {step} was not evaluated; evaluated steps: {sorted(steps.index.tolist())}")
        return int(step)
    best = steps[steps == steps.max()]
    return int(best.index.max())


def curve_label(frame: pd.DataFrame) -> pd.Series:
    """Model name, plus the conditioning block when the frame holds several."""
    if frame["conditioning"].nunique(dropna=True) > 1:
        return frame["model"].astype(str) + " " + frame["conditioning"].astype(str)
    return frame["model"].astype(str)


def per_model(frame: pd.DataFrame, step: int | None = None) -> tuple[pd.DataFrame, int]:
    """One row per (model, conditioning) at `step` in the default sampling setting, metrics averaged
    over seeds (column n_seeds counts them). fid_se: the standard error of that FID -- the spread over
    seeds / sqrt(seeds) with several seeds, else the evaluation's bootstrap over samples (NaN if absent)."""
    rows = default_setting(frame)
    step = choose_step(rows, step)
    rows = rows[rows["step"] == step].copy()
    rows["label"] = curve_label(rows)
    agg = {m: "mean" for m in METRICS}
    agg.update(gflops="mean", params="mean", tokens="mean", train_compute="mean", size="first", patch="first",
               seed="nunique", fid_se="mean")
    # one record's provenance and features, for a paired comparison (`verdict`); none over several seeds
    agg.update({c: "first" for c in (*_RECORD_KEYS, *PAIRING_COLUMNS, "fid_features") if c in rows})
    keys = ["label", "model", "conditioning"]
    out = rows.groupby(keys, as_index=False).agg(agg).rename(columns={"seed": "n_seeds"})
    sd = rows.groupby(keys)["fid"].std().to_numpy()
    seeds_se = sd / np.sqrt(out["n_seeds"].to_numpy())
    out["fid_se"] = np.where(out["n_seeds"] > 1, seeds_se, out["fid_se"])
    if "fid_features" in out:
        out["fid_features"] = out["fid_features"].where(out["n_seeds"] == 1, None)
    return out, step


# the setting of the record a per_model row stands for (its pairing provenance: PAIRING_COLUMNS)
_RECORD_KEYS = ("run_id", "step", "sampling_steps", "sampler", "cfg_scale", "num_samples", "num_classes",
                "image_size", "feature_space", "reference")


RESOLVE_Z = 1.645  # a difference is resolved when it exceeds 1.645 standard errors (two-sided 90%)

#: the paired standard error of FID_a - FID_b of two rows, or None where they are not provably paired or lack
#: their features (the report's: harness.report.paired.PairedErrors)
PairedSE = Callable[[Mapping, Mapping], "float | None"]


def compare(a: float, se_a: float, b: float, se_b: float, se_diff: float = float("nan")) -> str:
    """The rule of harness.metrics.stats' docstring: 'resolved' when |a - b| > RESOLVE_Z * se_diff, the paired
    standard error of a - b, where one is given; else when |a - b| > RESOLVE_Z * sqrt(se_a^2 + se_b^2); 'not
    resolved at this budget' when not, 'no uncertainty recorded' when the errors are missing."""
    if np.isfinite(se_diff):
        return "resolved" if abs(a - b) > RESOLVE_Z * se_diff else "not resolved at this budget"
    if not (np.isfinite(se_a) and np.isfinite(se_b)):
        return "no uncertainty recorded"
    return "resolved" if abs(a - b) > RESOLVE_Z * np.hypot(se_a, se_b) else "not resolved at this budget"


@dataclass(frozen=True)
class Verdict:
    """Two FIDs compared: compare()'s status, whether the paired error judged it, and the standard error of
    their difference that did (the paired one, or the two combined; NaN when none)."""
    status: str
    paired: bool
    se: float


def verdict(a: Mapping, b: Mapping, paired_se: PairedSE | None = None) -> Verdict:
    """FID rows `a` and `b` (per_model rows) compared by the paired error where `paired_se` gives one, else by
    their two errors combined."""
    fa, fb = float(a["fid"]), float(b["fid"])
    se_a, se_b = float(a.get("fid_se", np.nan)), float(b.get("fid_se", np.nan))
    se = paired_se(a, b) if paired_se is not None else None
    if se is not None and np.isfinite(se):
        return Verdict(compare(fa, se_a, fb, se_b, se), True, float(se))
    return Verdict(compare(fa, se_a, fb, se_b), False, float(np.hypot(se_a, se_b)))


def patch_pairs(models: pd.DataFrame, metric: str = "fid", paired_se: PairedSE | None = None) -> list[dict]:
    """At each model size evaluated with several patch sizes: each pair of neighbouring patch sizes
    (smaller, larger) with their metric and whether the smaller patch scores lower (the paper's
    finding); for FID, `verdict`'s status and whether it was paired. `models`: per_model() rows of one
    conditioning block."""
    pairs = []
    for size, group in models.dropna(subset=[metric]).groupby("size", sort=False):
        group = group.sort_values("patch")
        for (_, small), (_, large) in zip(group.iterrows(), group.iloc[1:].iterrows()):
            se = (float(small.get("fid_se", np.nan)), float(large.get("fid_se", np.nan))) if metric == "fid" \
                else (np.nan, np.nan)
            v = verdict(small, large, paired_se) if metric == "fid" else Verdict("no uncertainty recorded", False,
                                                                                  np.nan)
            pairs.append({"size": size, "small_patch": int(small["patch"]), "large_patch": int(large["patch"]),
                          "small": float(small[metric]), "large": float(large[metric]),
                          "small_se": se[0], "large_se": se[1],
                          "smaller_wins": bool(small[metric] < large[metric]),
                          "status": v.status, "paired": v.paired, "diff_se": v.se})
    return pairs


def conditioning_ranking(models: pd.DataFrame, metric: str = "fid") -> dict[str, list[tuple[str, float, float]]]:
    """For each model evaluated with several conditioning blocks: [(block, metric, its standard error
    or NaN)] best first. `models`: per_model() rows over all blocks."""
    ranking = {}
    for model, group in models.dropna(subset=[metric]).groupby("model", sort=False):
        if group["conditioning"].nunique() > 1:
            group = group.sort_values(metric)
            se = group["fid_se"] if metric == "fid" and "fid_se" in group else pd.Series(np.nan, group.index)
            ranking[model] = [(c, float(v), float(e)) for c, v, e in zip(group["conditioning"], group[metric], se)]
    return ranking


def conditioning_verdicts(models: pd.DataFrame, paired_se: PairedSE | None = None) -> dict[str, list[Verdict]]:
    """For each model of conditioning_ranking (FID): the `verdict` of each neighbouring pair, best first."""
    out = {}
    for model, group in models.dropna(subset=["fid"]).groupby("model", sort=False):
        if group["conditioning"].nunique() > 1:
            rows = [r for _, r in group.sort_values("fid").iterrows()]
            out[model] = [verdict(a, b, paired_se) for a, b in zip(rows, rows[1:])]
    return out


# ----------------------------------------------------------------------------------- correlation
@dataclass
class Correlation:
    """Pearson on log10(x) (as the paper's figures) and Spearman rank correlation."""

    metric: str
    n: int
    pearson_r: float
    pearson_p: float
    spearman_rho: float
    spearman_p: float
    x: str = "gflops"
    step: int | None = None


def correlation(x: np.ndarray, y: np.ndarray, metric: str = "fid", x_name: str = "gflops",
                step: int | None = None) -> Correlation:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        nan = float("nan")
        return Correlation(metric, len(x), nan, nan, nan, nan, x_name, step)
    pr = stats.pearsonr(np.log10(x), y)
    sr = stats.spearmanr(x, y)
    return Correlation(metric, len(x), float(pr.statistic), float(pr.pvalue),
                       float(sr.statistic), float(sr.pvalue), x_name, step)


def correlations(frame: pd.DataFrame, step: int | None = None, x: str = "gflops",
                 metrics: tuple[str, ...] = tuple(METRICS)) -> list[Correlation]:
    """Correlation of model Gflops (or another x column) with each metric at one step."""
    models, step = per_model(frame, step)
    return [correlation(models[x].to_numpy(), models[m].to_numpy(), m, x, step)
            for m in metrics if models[m].notna().sum() >= 1]


# ----------------------------------------------------------------------------------- fits
# The power laws themselves are fitted by harness.study.laws (power_law, PowerLawFit).
def ci_text(ci: tuple[float, float], fmt: str = ".3f") -> str:
    """'[lo, hi]', or 'CI n/a (< 3 runs)' when the bootstrap had too few runs to give one."""
    if not all(np.isfinite(ci)):
        return "[CI n/a: < 3 runs]"
    return f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


@dataclass
class Extrapolation:
    target: float
    value: float
    lo: float
    hi: float
    form: str
    level: float


def extrapolate(fit: laws.PowerLawFit, target: float) -> Extrapolation:
    """The fitted metric at compute `target`, with its bootstrap interval."""
    lo, hi = fit.interval(target)
    return Extrapolation(float(target), float(fit.predict(target)), float(lo[0]), float(hi[0]), fit.form, fit.level)


# ----------------------------------------------------------------------------------- frontier
@dataclass
class Crossover:
    compute: float
    before: str   # best model below this compute
    after: str    # best model above it


@dataclass
class Frontier:
    """The compute-efficient frontier: the best curve at each compute (log-spaced grid)."""

    grid: np.ndarray
    best: list[str | None]
    best_value: np.ndarray
    crossovers: list[Crossover]
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    metric: str = "fid"
    x: str = "train_compute"


def interp(cx: np.ndarray, cy: np.ndarray, c: float) -> float:
    """Linear in log-log (exact for a power law) inside the curve's range, NaN outside; linear in
    log10(compute) when the metric has values <= 0."""
    if c < cx[0] * (1 - 1e-9) or c > cx[-1] * (1 + 1e-9):
        return float("nan")
    if len(cx) == 1:
        return float(cy[0])
    if np.all(cy > 0):
        return float(10 ** np.interp(np.log10(c), np.log10(cx), np.log10(cy)))
    return float(np.interp(np.log10(c), np.log10(cx), cy))


def curves(frame: pd.DataFrame, metric: str = "fid", x: str = "train_compute", by: str = "label"
           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Curve per label (model [+ conditioning]) or per run_id: x sorted, metric averaged over seeds."""
    rows = default_setting(frame).copy()
    rows["label"] = curve_label(rows)
    rows = rows[rows[metric].notna() & rows[x].notna() & (rows[x] > 0)]
    out = {}
    for key, g in rows.groupby(by):
        m = g.groupby(x)[metric].mean().sort_index()
        out[str(key)] = (m.index.to_numpy(float), m.to_numpy(float))
    return out


def frontier_from_curves(cv: dict[str, tuple[np.ndarray, np.ndarray]], metric: str = "fid",
                         x: str = "train_compute", n_grid: int = 256, lower_is_better: bool = True) -> Frontier:
    if not cv:
        raise HarnessError(f"no ({x}, {metric}) points to build a frontier from")
    lo = min(c[0][0] for c in cv.values())
    hi = max(c[0][-1] for c in cv.values())
    grid = np.geomspace(lo, hi, n_grid) if hi > lo else np.array([lo])
    sign = 1.0 if lower_is_better else -1.0
    names = list(cv)
    vals = np.array([[interp(*cv[k], g) for g in grid] for k in names])  # (models, grid)
    best, best_value = [], np.full(len(grid), np.nan)
    for j in range(len(grid)):
        col = sign * vals[:, j]
        if np.all(np.isnan(col)):
            best.append(None)
            continue
        i = int(np.nanargmin(col))
        best.append(names[i])
        best_value[j] = vals[i, j]
    crossovers = []
    for j in range(1, len(grid)):
        a, b = best[j - 1], best[j]
        if a is None or b is None or a == b:
            continue
        at = grid[j]
        fa, fb = (lambda t, k=a: interp(*cv[k], 10 ** t)), (lambda t, k=b: interp(*cv[k], 10 ** t))
        t0, t1 = np.log10(grid[j - 1]), np.log10(grid[j])
        d0, d1 = fa(t0) - fb(t0), fa(t1) - fb(t1)
        if np.isfinite(d0) and np.isfinite(d1) and d0 * d1 < 0:
            at = 10 ** optimize.brentq(lambda t: fa(t) - fb(t), t0, t1)
        crossovers.append(Crossover(float(at), a, b))
    return Frontier(grid, best, best_value, crossovers, cv, metric, x)


def frontier(frame: pd.DataFrame, metric: str = "fid", x: str = "train_compute", n_grid: int = 256) -> Frontier:
    """The best model at each training compute and the computes where one overtakes another."""
    return frontier_from_curves(curves(frame, metric, x), metric, x, n_grid, lower_is_better=metric != "inception_score"
                                and metric not in ("precision", "recall"))


def frontier_points(cv: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The evaluated points no other curve beats at the same compute: (compute, metric, curve key)."""
    xs, ys, ks = [], [], []
    for k, (cx, cy) in cv.items():
        for xv, yv in zip(cx, cy):
            others = [interp(*cv[o], xv) for o in cv if o != k]
            if all(not (np.isfinite(v) and v < yv) for v in others):
                xs.append(xv), ys.append(yv), ks.append(k)
    return np.array(xs, float), np.array(ys, float), np.array(ks, dtype=object)


def fit_frontier(frame: pd.DataFrame, metric: str = "fid", x: str = "train_compute", n_boot: int = 500,
                 level: float = 0.95, seed: int = 0) -> laws.PowerLawFit:
    """Power law through the frontier points; the bootstrap resamples runs and rebuilds the frontier."""
    cv = curves(frame, metric, x, by="run_id")
    fx, fy, fk = frontier_points(cv)
    point = laws.power_law(fx, fy, fk, n_boot=0, level=level)
    rng = np.random.default_rng(seed)
    keys = list(cv)
    boot = []
    if len(keys) < 3:  # too few runs for a bootstrap interval
        n_boot = 0
    for _ in range(n_boot):
        pick = rng.integers(0, len(keys), len(keys))
        counts = np.bincount(pick, minlength=len(keys))
        sub = {keys[i]: cv[keys[i]] for i in np.flatnonzero(counts)}
        bx, by_, bk = frontier_points(sub)
        if len(np.unique(bx)) < 2:
            continue
        w = np.array([counts[keys.index(k)] for k in bk], int)   # a run drawn k times counts k times
        try:
            refit = laws.fit(laws.POWER_LOGLOG, {"compute": np.repeat(bx, w)}, np.repeat(by_, w))
        except HarnessError:   # two points drawn once each: no residual left to fit
            continue
        boot.append(laws.power_ab(refit))
    return point.with_boot(np.array(boot).reshape(-1, 2)) if boot else point


# ----------------------------------------------------------------------------------- sampling compute
def sampling_study(frame: pd.DataFrame) -> pd.DataFrame:
    """Each run's last evaluated step, every sampling setting, with sampling_compute (Gflops per image)
    = gflops x model evaluations (sampling_steps but for Heun's 2 per step) x (2 with guidance, cfg_scale != 1)."""
    last = frame.groupby("run_id")["step"].transform("max")
    rows = frame[(frame["step"] == last) & frame["sampling_steps"].notna()].copy()
    rows["label"] = curve_label(rows)
    guided = rows["cfg_scale"].notna() & ~np.isclose(rows["cfg_scale"].fillna(1.0), 1.0)
    rows["guidance_factor"] = np.where(guided, 2, 1)
    evaluations = (rows["model_evaluations"] if "model_evaluations" in rows else rows["sampling_steps"])
    evaluations = evaluations.fillna(rows["sampling_steps"]).astype(float)
    rows["sampling_compute"] = rows["gflops"] * evaluations * rows["guidance_factor"]
    return rows.sort_values(["label", "cfg_scale", "sampling_steps"]).reset_index(drop=True)
