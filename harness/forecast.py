"""Forecasting big runs from small ones: hold-out specs, back-tests, choice of law by held-out error.

    points = sweep_points(frame)            # one row per run at one step (or paper_points())
    result = backtest(points, "largest:2")  # fit on the rest, predict the held-out runs, per candidate

The candidate (a law of harness.laws and how it is fitted) is chosen inside the training runs only:
by leave-largest-out error (the largest k training models predicted from the others; the default,
since a forecast extrapolates) or by leave-one-out error. Candidates whose fit on the training runs
ends on a bound are not eligible. Error of a prediction: |log(predicted / actual)|.
`harness forecast` prints the back-test; `forecast_next` predicts beyond the largest run.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness import laws
from harness.errors import HarnessError

log = logging.getLogger(__name__)

CRITERIA = ("llo", "loo")
LEVEL = 0.9
INPUTS = ("compute", "params", "tokens")


# ----------------------------------------------------------------------------------- points
def sweep_points(frame: pd.DataFrame, step: int | None = None, conditioning: str | None = None) -> tuple[pd.DataFrame, int]:
    """One row per run (seed) at `step` (default: the largest step most runs reached) in the default
    sampling setting, main conditioning block: name (model), run_id, size, patch, compute (Gflops),
    params, tokens, fid, fid_se."""
    from harness.analysis import choose_step
    from harness.report.figures import main_conditioning
    from harness.results import default_setting

    rows = default_setting(frame)
    cond = conditioning or main_conditioning(frame)
    rows = rows[(rows["conditioning"] == cond) & rows["fid"].notna()]
    step = choose_step(rows, step)
    rows = rows[rows["step"] == step]
    out = pd.DataFrame({"name": rows["model"].astype(str), "run_id": rows["run_id"].astype(str),
                        "size": rows["size"], "patch": rows["patch"], "compute": rows["gflops"].astype(float),
                        "params": rows["params"].astype(float), "tokens": rows["tokens"].astype(float),
                        "fid": rows["fid"].astype(float), "fid_se": rows["fid_se"].astype(float)})
    return out.groupby("run_id", as_index=False).first().sort_values(["compute", "run_id"]).reset_index(drop=True), step


def paper_points() -> pd.DataFrame:
    """Table 4's 12 adaLN-Zero models at 256px, 400K steps, as forecast points (tokens: 32/patch squared)."""
    from harness.paper import table4

    rows = [r for r in table4() if r["conditioning"] == "adaLN-Zero" and r["image_size"] == 256
            and r["train_steps"] == 400000]
    out = pd.DataFrame({"name": [r["model"] for r in rows], "run_id": [r["model"] for r in rows],
                        "size": [r["size"] for r in rows], "patch": [r["patch"] for r in rows],
                        "compute": [float(r["gflops"]) for r in rows],
                        "params": [r["params_m"] * 1e6 for r in rows],
                        "tokens": [float((r["image_size"] // 8 // r["patch"]) ** 2) for r in rows],
                        "fid": [float(r["fid50k"]) for r in rows], "fid_se": np.nan})
    return out.sort_values("compute").reset_index(drop=True)


def _X(points: pd.DataFrame) -> dict:
    return {k: points[k].to_numpy(float) for k in INPUTS}


# ----------------------------------------------------------------------------------- hold-out specs
def held_out(points: pd.DataFrame, spec: str) -> np.ndarray:
    """Boolean mask of the held-out rows. SPEC: `largest:K` (the K largest models by Gflops),
    `size:S`, `patch:P`, or comma-separated model names or run ids."""
    spec = (spec or "").strip()
    models = points.groupby("name")["compute"].mean().sort_values()
    if spec.startswith("largest:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = 0
        if not 1 <= k <= len(models) - 3:
            raise HarnessError(f"--hold-out {spec}: K must be a whole number from 1 to {len(models) - 3} "
                               f"(the sweep has {len(models)} models and a fit needs at least 3); e.g. largest:2")
        mask = points["name"].isin(models.index[-k:])
    elif spec.startswith("size:"):
        mask = points["size"].astype(str) == spec.split(":", 1)[1]
    elif spec.startswith("patch:"):
        mask = points["patch"].astype(str) == spec.split(":", 1)[1]
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
        unknown = [n for n in names if n not in set(points["name"]) | set(points["run_id"])]
        if unknown or not names:
            raise HarnessError(f"--hold-out {spec!r}: {', '.join(unknown) or 'empty'} is not a model or run of "
                               f"this sweep; use largest:K, size:S, patch:P or names from: {', '.join(models.index)}")
        mask = points["name"].isin(names) | points["run_id"].isin(names)
    mask = mask.to_numpy(bool)
    if not mask.any() or (~mask).sum() < 3:
        raise HarnessError(f"--hold-out {spec}: holds out {mask.sum()} of {len(mask)} runs; it must hold out at "
                           "least one and leave at least 3 to fit")
    return mask


# ----------------------------------------------------------------------------------- selection
def _log_err(pred: np.ndarray, true: np.ndarray) -> float:
    pred = np.asarray(pred, float)
    if np.any(~np.isfinite(pred) | (pred <= 0)):
        return float("inf")
    return float(np.mean(np.abs(np.log(pred / true))))


def inner_error(choice: laws.Choice, points: pd.DataFrame, criterion: str, k_inner: int) -> float:
    """Held-out error inside `points`: leave-largest-out (the k_inner largest models predicted from
    the rest) or leave-one-out (each model in turn). inf when a fold cannot be fitted."""
    order = points.groupby("name")["compute"].mean().sort_values().index.tolist()
    folds = [order[-k_inner:]] if criterion == "llo" else [[m] for m in order]
    errs = []
    for out in folds:
        test = points["name"].isin(out).to_numpy()
        try:
            f = laws.fit(choice, _X(points[~test]), points.loc[~test, "fid"])
        except HarnessError:
            return float("inf")
        errs.append(_log_err(f.predict(_X(points[test])), points.loc[test, "fid"].to_numpy()))
    return float(np.mean(errs))


@dataclass
class Candidate:
    choice: laws.Choice
    fit: laws.Fit | None
    llo: float
    loo: float
    eligible: bool
    why_not: str = ""


def rank(points: pd.DataFrame, k_inner: int, n_boot: int = 200, seed: int = 0,
         candidates: list[laws.Choice] | None = None) -> list[Candidate]:
    """Every candidate fitted to `points` and scored by both held-out errors; the eligible ones (no
    parameter on a bound) get a bootstrap."""
    out = []
    groups = points["name"].to_numpy()
    for choice in candidates or laws.choices():
        try:
            f = laws.fit(choice, _X(points), points["fid"])
        except HarnessError as err:
            out.append(Candidate(choice, None, np.inf, np.inf, False, str(err)))
            continue
        llo = inner_error(choice, points, "llo", k_inner)
        loo = inner_error(choice, points, "loo", k_inner)
        why = f"{', '.join(f.at_bound)} on a bound" if f.at_bound else ("" if np.isfinite(llo) else "a fold failed")
        if not why and n_boot:
            laws.bootstrap(f, _X(points), points["fid"], groups, n_boot, seed)
        out.append(Candidate(choice, f, llo, loo, not why, why))
    return out


def chosen(cands: list[Candidate], criterion: str) -> Candidate:
    """The eligible candidate with the lowest error under `criterion` (fewer parameters on ties)."""
    if criterion not in CRITERIA:
        raise HarnessError(f"--select {criterion}: choose from {', '.join(CRITERIA)}")
    ok = [c for c in cands if c.eligible]
    if not ok:
        raise HarnessError("no law could be fitted to these runs without ending on a bound; run more models")
    return min(ok, key=lambda c: (getattr(c, criterion), len(c.fit.theta)))


# ----------------------------------------------------------------------------------- back-test
def _describe(c: Candidate, y: np.ndarray, level: float) -> dict:
    """Parameters with intervals, or 'not identified: why', of a fitted candidate."""
    if c.fit is None:
        return {}
    ident, cis = c.fit.identification(y, level), c.fit.param_intervals(level)
    return {n: ({"value": v, "ci": list(cis[n])} if ident[n] is None else f"not identified: {ident[n]}")
            for n, v in c.fit.params().items()}


def backtest(points: pd.DataFrame, spec: str, criterion: str = "llo", n_boot: int = 200, level: float = LEVEL,
             seed: int = 0) -> dict:
    """Fit every candidate on the runs that `spec` keeps, choose one by `criterion` inside them, and
    predict the held-out runs with `level` prediction intervals. JSON-ready dict."""
    mask = held_out(points, spec)
    train, test = points[~mask].reset_index(drop=True), points[mask].reset_index(drop=True)
    k_inner = max(1, min(int(test["name"].nunique()), train["name"].nunique() - 5))
    cands = rank(train, k_inner, n_boot, seed)
    best = chosen(cands, criterion)
    rows = []
    for c in cands:
        row = {"law": c.choice.label, "choice": dict(c.choice.__dict__), "llo_error": c.llo, "loo_error": c.loo,
               "eligible": c.eligible, "why_not": c.why_not, "chosen": c is best, "predictions": []}
        if c.fit is not None:
            pred = c.fit.predict(_X(test))
            lo, hi = c.fit.interval(_X(test), level, seed=seed)
            for (_, r), p, a, b in zip(test.iterrows(), pred, lo, hi):
                row["predictions"].append({"name": r["name"], "run_id": r["run_id"], "actual": float(r["fid"]),
                                           "predicted": float(p), "lo": float(a), "hi": float(b),
                                           "error_pct": float(100 * (p / r["fid"] - 1)),
                                           "covered": bool(a <= r["fid"] <= b)})
            row["params"] = _describe(c, train["fid"].to_numpy(), level)
        rows.append(row)
    return {"hold_out": spec, "criterion": criterion, "k_inner": k_inner, "level": level, "n_boot": n_boot,
            "train": train["name"].tolist(), "test": test["name"].tolist(), "chosen": best.choice.label,
            "chosen_by_other": chosen(cands, "loo" if criterion == "llo" else "llo").choice.label,
            "candidates": rows}


def backtest_fit(points: pd.DataFrame, res: dict) -> laws.Fit:
    """The chosen law of a `backtest` result refitted (no bootstrap) to its training runs."""
    best = next(c for c in res["candidates"] if c["chosen"])
    train = points[~points["name"].isin(res["test"])]
    return laws.fit(laws.Choice(**best["choice"]), _X(train), train["fid"])


def forecast_next(points: pd.DataFrame, criterion: str = "llo", n_boot: int = 200, level: float = LEVEL,
                  factor: float = 2.0, seed: int = 0) -> dict:
    """The chosen law fitted to all runs, predicting a model `factor`x larger than the largest one (its
    parameters and Gflops x factor, same tokens): {law, model, compute, params, tokens, predicted, lo, hi}."""
    k_inner = max(1, min(2, points["name"].nunique() - 5))
    best = chosen(rank(points, k_inner, 0, seed), criterion)   # choosing needs no bootstrap; only the chosen law's
    laws.bootstrap(best.fit, _X(points), points["fid"], points["name"].to_numpy(), n_boot, seed)
    top = points.sort_values("compute").iloc[-1]
    X = {"compute": np.array([top["compute"] * factor]), "params": np.array([top["params"] * factor]),
         "tokens": np.array([top["tokens"]])}
    lo, hi = best.fit.interval(X, level, seed=seed)
    return {"law": best.choice.label, "model": f"{factor:g}x {top['name']} (params and Gflops x {factor:g})",
            "compute": float(X["compute"][0]), "params": float(X["params"][0]), "tokens": float(X["tokens"][0]),
            "predicted": float(best.fit.predict(X)[0]), "lo": float(lo[0]), "hi": float(hi[0]), "level": level,
            "fit": best.fit}


# ----------------------------------------------------------------------------------- text
def format_backtest(res: dict) -> str:
    """Per candidate: inner errors, and per held-out run predicted vs actual, % error, covered."""
    pct = f"{res['level']:.0%}"
    lines = [f"hold-out {res['hold_out']}: fit on {len(res['train'])} runs, predict {', '.join(res['test'])}",
             f"chosen by {res['criterion']} error inside the training runs (k = {res['k_inner']}): {res['chosen']}"
             f"   (by {'loo' if res['criterion'] == 'llo' else 'llo'}: {res['chosen_by_other']})", ""]
    head = f"{'':2}{'law':44} {'llo err':>8} {'loo err':>8}  {'run':10} {'actual':>7} {'pred':>7} {pct + ' interval':>18} {'err %':>7} cover"
    lines += [head, "-" * len(head)]
    for c in res["candidates"]:
        mark = "*" if c["chosen"] else ("" if c["eligible"] else "x")
        first = f"{mark:2}{c['law']:44} {c['llo_error']:8.3f} {c['loo_error']:8.3f}"
        if not c["predictions"]:
            lines.append(f"{first}  (not fitted: {c['why_not']})")
            continue
        for i, p in enumerate(c["predictions"]):
            lead = first if i == 0 else " " * len(first)
            iv = f"[{p['lo']:.3g}, {p['hi']:.3g}]" if np.isfinite(p["lo"]) else "n/a"
            lines.append(f"{lead}  {p['name']:10} {p['actual']:7.3g} {p['predicted']:7.3g} {iv:>18} "
                         f"{p['error_pct']:+7.1f} {'yes' if p['covered'] else 'no'}")
    lines += ["", "* chosen; x not eligible (a parameter on a bound of its fit). Errors: mean |log(pred/actual)|."]
    return "\n".join(lines)


def _finite(obj):
    """The back-test dict with non-finite floats as null (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def cli_forecast(args) -> int:
    """`harness forecast [SWEEP | --paper] --hold-out SPEC [--select llo|loo] [--format json]`."""
    if args.paper == bool(args.sweep):
        raise HarnessError("harness forecast: name a sweep (sweeps/NAME.yaml or NAME) or pass --paper, not both")
    if args.paper:
        points = paper_points()
    else:
        from harness.results import load_sweep
        points, _ = sweep_points(load_sweep(args.results, args.sweep).frame, args.step)
    res = backtest(points, args.hold_out, args.select, n_boot=args.n_boot)
    print(json.dumps(_finite(res), indent=2) if args.format == "json" else format_backtest(res))
    return 0


# ----------------------------------------------------------------------------------- compute-optimal
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
    from harness.analysis import _interp, curves
    from harness.report.figures import main_conditioning

    main = frame[frame["conditioning"] == main_conditioning(frame)]
    cv = {k: v for k, v in curves(main, "fid", "train_compute").items() if len(v[0]) >= 2}
    if len(cv) < 2:
        return None
    g = main.groupby("model")["gflops"].mean()
    models = sorted(cv, key=lambda k: g.get(k, np.nan))
    gflops = np.array([g.get(k, np.nan) for k in models], float)
    lo, hi = min(cv[k][0][0] for k in models), max(cv[k][0][-1] for k in models)
    grid = np.geomspace(lo, hi, 4 * n_budgets)
    fid = np.array([[_interp(*cv[k], b) for b in grid] for k in models])
    grid_ok = np.isfinite(fid).sum(axis=0) >= 2  # budgets where at least two models can be compared
    if grid_ok.sum() < 2:
        return None
    budgets = np.geomspace(grid[grid_ok].min(), grid[grid_ok].max(), n_budgets)
    fid = np.array([[_interp(*cv[k], b) for b in budgets] for k in models])
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
