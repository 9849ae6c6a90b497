"""The end of a run from its start: FID against training steps, fitted to the checkpoints up to step
K, predicts each run's FID at a later step S with an interval.

    res = step_forecast(frame, at_step=2000, from_steps=1000)

Curves (log FID, least squares; z = step / s0, s0 the geometric mean of the fitted steps; each run's
FID normalised by its own median):
  saturating   FID_r(s) = E_r + A_r z^-alpha        power   FID_r(s) = A_r z^-alpha
Jointly: one alpha shared by all runs (the paper's Figure 2 shows curves of one shape), E_r and A_r per
run. Per run: each run alone, shown for comparison.
Rule, written before the mini study was evaluated: the saturating form when it leaves >= MIN_DOF
residual degrees of freedom (FID saturates with training), else the power form. Interval: as
harness.study.laws' -- t (n - k degrees of freedom) x the leave-one-checkpoint-out RMS error in log FID x
sqrt(1 + leverage), with a prior of sd 1 on each normalised parameter.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
from scipy import optimize, stats

from harness.study.analysis import curve_label
from harness.errors import HarnessError
from harness.study.laws import LEVEL, MIN_DOF, finite_json
from harness.study.results import default_setting, load_sweep

EXPONENT_MAX, OFFSET_MIN = 5.0, -10.0


class StepCurve:
    """A fitted family of curves: runs r = 0..R-1, shared exponent; theta = [alpha, A_0.., (E_0..)]."""

    def __init__(self, run: np.ndarray, steps: np.ndarray, fid: np.ndarray, form: str):
        self.form, self.run, self.R = form, np.asarray(run), int(np.max(run)) + 1
        self.s0 = float(np.exp(np.mean(np.log(steps))))
        self.scale = np.array([np.median(fid[self.run == r]) for r in range(self.R)])
        self.steps, self.fid = np.asarray(steps, float), np.asarray(fid, float)
        self.k = 1 + self.R * (2 if form == "saturating" else 1)
        self.theta = self._solve(self.run, self.steps, self.fid)
        self.loo = np.full(len(fid), np.nan)

    def _value(self, theta, run, steps) -> np.ndarray:
        z = steps / self.s0
        v = theta[1 + run] * z ** -theta[0]
        return v + theta[1 + self.R + run] if self.form == "saturating" else v

    def _grad(self, theta, run, steps) -> np.ndarray:
        """d log(value) / d theta (m, k)."""
        z, v = steps / self.s0, np.maximum(self._value(theta, run, steps), 1e-9)
        g = np.zeros((len(run), self.k))
        zx = z ** -theta[0]
        g[:, 0] = -theta[1 + run] * zx * np.log(z) / v
        g[np.arange(len(run)), 1 + run] = zx / v
        if self.form == "saturating":
            g[np.arange(len(run)), 1 + self.R + run] = 1 / v
        return g

    def _solve(self, run, steps, fid) -> np.ndarray:
        yn = np.log(fid / self.scale[run])
        lo = [0.0] + [0.0] * self.R + ([OFFSET_MIN] * self.R if self.form == "saturating" else [])
        hi = [EXPONENT_MAX] + [np.inf] * (self.k - 1)
        best = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for a0 in (0.3, 1.0):
                for e0 in ((0.0, 0.5) if self.form == "saturating" else (0.0,)):
                    x0 = np.r_[a0, np.full(self.R, 1.0 - e0), np.full(self.k - 1 - self.R, e0)]
                    res = optimize.least_squares(
                        lambda t: np.log(np.clip(self._value(t, run, steps), 1e-9, None)) - yn,
                        np.clip(x0, np.array(lo) + 1e-9, np.array(hi) - 1e-9),
                        jac=lambda t: self._grad(t, run, steps), bounds=(lo, hi), x_scale="jac", max_nfev=500)
                    if best is None or res.cost < best.cost:
                        best = res
        return best.x

    def predict(self, run, steps) -> np.ndarray:
        run = np.asarray(run)
        return self.scale[run] * self._value(self.theta, run, np.asarray(steps, float))

    def leave_one_out(self) -> "StepCurve":
        """Each checkpoint predicted by the curves fitted to the others: log(pred / actual)."""
        for i in range(len(self.fid)):
            keep = np.arange(len(self.fid)) != i
            if not np.any(self.run[keep] == self.run[i]):
                continue
            theta = self._solve(self.run[keep], self.steps[keep], self.fid[keep])
            pred = self.scale[self.run[i]] * self._value(theta, self.run[i:i + 1], self.steps[i:i + 1])[0]
            self.loo[i] = np.log(pred / self.fid[i])
        return self

    def interval(self, run, steps, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
        run, steps = np.asarray(run), np.asarray(steps, float)
        dof, ok = len(self.fid) - self.k, self.loo[np.isfinite(self.loo)]
        if dof < 1 or len(ok) < 2:
            return np.full(len(run), np.nan), np.full(len(run), np.nan)
        s = float(np.sqrt(np.mean(ok ** 2)))
        g, J = self._grad(self.theta, run, steps), self._grad(self.theta, self.run, self.steps)
        v = np.einsum("mk,kl,ml->m", g, np.linalg.inv(J.T @ J + s ** 2 * np.eye(self.k)), g)
        half = stats.t.ppf((1 + level) / 2, dof) * s * np.sqrt(1 + v)
        pred = self.predict(run, steps)
        return pred * np.exp(-half), pred * np.exp(half)


def choose_form(n_points: int, n_runs: int) -> str:
    """The rule: saturating when 2 parameters per run + 1 shared leave >= MIN_DOF degrees of freedom."""
    return "saturating" if n_points - (2 * n_runs + 1) >= MIN_DOF else "power"


def curves_of(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, evaluated step) in the default sampling setting: run_id, label, step, fid."""
    rows = default_setting(frame)
    rows = rows[rows["fid"].notna()].copy()
    rows["label"] = curve_label(rows)
    return (rows.groupby(["run_id", "step"], as_index=False).agg(label=("label", "first"), fid=("fid", "mean"))
            .sort_values(["run_id", "step"]).reset_index(drop=True))


def _fit(data: pd.DataFrame, ids: list[str]) -> StepCurve:
    run = data["run_id"].map({r: i for i, r in enumerate(ids)}).to_numpy()
    return StepCurve(run, data["step"].to_numpy(float), data["fid"].to_numpy(float),
                     choose_form(len(data), len(ids))).leave_one_out()


def step_forecast(frame: pd.DataFrame, at_step: int, from_steps: int | None = None, level: float = LEVEL) -> dict:
    """Each run's FID at `at_step` from its checkpoints at steps <= `from_steps` (default: all before
    `at_step`): the joint forecast, the per-run one, and the truth where that step was evaluated."""
    cv = curves_of(frame)
    K = at_step - 1 if from_steps is None else from_steps
    used = cv[cv["step"] <= K]
    counts = used.groupby("run_id")["step"].nunique()
    ids = counts.index[counts >= 2].tolist()
    if not ids:
        raise HarnessError(f"--from-steps {K}: no run has 2 evaluated checkpoints at or below step {K:,} "
                           f"(evaluated steps: {sorted(cv['step'].unique().tolist())}); raise --from-steps")
    data = used[used["run_id"].isin(ids)]
    joint = _fit(data, ids)
    out = []
    for i, rid in enumerate(ids):
        own = data[data["run_id"] == rid]
        alone = _fit(own, [rid])
        truth = cv[(cv["run_id"] == rid) & (cv["step"] == at_step)]["fid"]
        pred, (lo, hi) = joint.predict([i], [at_step])[0], joint.interval([i], [at_step], level)
        plo, phi = alone.interval([0], [at_step], level)
        actual = float(truth.iloc[0]) if len(truth) else float("nan")
        out.append({"run_id": rid, "label": own["label"].iloc[0], "fit_steps": own["step"].tolist(),
                    "steps": cv.loc[cv["run_id"] == rid, "step"].tolist(),
                    "fids": cv.loc[cv["run_id"] == rid, "fid"].tolist(), "predicted": float(pred),
                    "lo": float(lo[0]), "hi": float(hi[0]), "actual": actual,
                    "error_pct": float(100 * (pred / actual - 1)) if len(truth) else float("nan"),
                    "covered": bool(lo[0] <= actual <= hi[0]) if len(truth) else None,
                    "alone": {"form": alone.form, "predicted": float(alone.predict([0], [at_step])[0]),
                              "lo": float(plo[0]), "hi": float(phi[0])}})
    judged = [r for r in out if r["covered"] is not None]
    return {"at_step": at_step, "from_steps": K, "level": level, "form": joint.form, "alpha": float(joint.theta[0]),
            "dof": len(data) - joint.k, "skipped": sorted(set(cv["run_id"]) - set(ids)), "runs": out,
            "coverage": float(np.mean([r["covered"] for r in judged])) if judged else float("nan"),
            "fit": joint}


def format_step_forecast(res: dict) -> str:
    pct = f"{res['level']:.0%}"
    lines = [f"FID at step {res['at_step']:,} from the checkpoints at steps <= {res['from_steps']:,}: joint {res['form']} "
             f"curves, shared exponent {res['alpha']:.3g}, {res['dof']} residual degrees of freedom", ""]
    head = f"{'run':44} {'used steps':>16} {'pred':>7} {pct + ' interval':>18} {'actual':>7} {'err %':>7} cover  {'alone':>7}"
    lines += [head, "-" * len(head)]
    for r in res["runs"]:
        iv = f"[{r['lo']:.3g}, {r['hi']:.3g}]" if np.isfinite(r["lo"]) else "n/a"
        cover = "-" if r["covered"] is None else ("yes" if r["covered"] else "no")
        lines.append(f"{r['label']:44} {','.join(f'{s:g}' for s in r['fit_steps']):>16} {r['predicted']:7.3g} {iv:>18} "
                     f"{r['actual']:7.3g} {r['error_pct']:+7.1f} {cover:5}  {r['alone']['predicted']:7.3g}")
    if np.isfinite(res["coverage"]):
        lines += ["", f"{res['coverage']:.0%} of the evaluated truths inside their {pct} intervals"]
    lines += [f"skipped (fewer than 2 checkpoints at or below {res['from_steps']:,}): {r}" for r in res["skipped"]]
    lines.append("alone: the run's own curve fitted without the other runs, for comparison")
    return "\n".join(lines)


def cli_step_forecast(args) -> int:
    if not args.sweep:
        raise HarnessError("--at-step forecasts the runs of a sweep: name it (sweeps/NAME.yaml or NAME)")
    res = step_forecast(load_sweep(args.results, args.sweep).frame, args.at_step, args.from_steps)
    res.pop("fit")
    print(json.dumps(finite_json(res), indent=2) if args.format == "json" else format_step_forecast(res))
    return 0
