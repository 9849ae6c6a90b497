"""The report's forecast section: the back-test of the scaling laws (predicted vs actual, residuals),
the compute-optimal (isoFLOP) view, and the forecast for a model larger than the sweep holds."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.study import forecast
from harness.study.compute_optimal import ComputeOptimal, compute_optimal
from harness.errors import HarnessError
from harness.report import figures as F
from harness.report.render import FigureSpec, Report, Table
from harness.report.step_section import add_stop_early_section

log = logging.getLogger(__name__)


def _pct(x: float) -> str:
    return f"{x:+.1f}%" if np.isfinite(x) else "–"


def hold_out_spec(points: pd.DataFrame) -> str:
    """largest:2 when at least 8 models remain to fit and choose with, else largest:1."""
    return "largest:2" if points["name"].nunique() >= 8 else "largest:1"


def backtest_figure(points: pd.DataFrame, res: dict) -> Figure:
    """Left: every fitted law's predictions of the held-out runs against the actual FID, the default
    method's with its intervals; right: the default method's residuals log(predicted / actual) against Gflops."""
    fig = Figure(figsize=(7.0, 5.6), dpi=110, layout="constrained")  # printed 1:1 (report.figures.PRINT_WIDTH_IN)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    fig.suptitle(f"Back-test: hold out {res['hold_out']}, fit on the rest ({res['level']:.0%} intervals)", fontsize=11)
    eligible = [c for c in res["candidates"] if not c["why_not"] and c["predictions"]]
    actual = [p["actual"] for p in eligible[0]["predictions"]] if eligible else []
    for k, c in enumerate(eligible):
        pr = c["predictions"]
        x = np.array([p["actual"] for p in pr]) * (1 + 0.012 * (k - len(eligible) / 2))  # dodge
        y = np.array([p["predicted"] for p in pr])
        err = np.array([[max(p["predicted"] - p["lo"], 0) for p in pr], [max(p["hi"] - p["predicted"], 0) for p in pr]])
        style = dict(color="black", marker="D", markersize=7, zorder=4) if c["default"] else \
            dict(color=F.EXTRA_COLOURS[k % len(F.EXTRA_COLOURS)], marker="o", markersize=4, alpha=0.8)
        ax1.errorbar(x, y, yerr=err if c["default"] and np.all(np.isfinite(err)) else None, linestyle="none",
                     capsize=3, label=("default: " if c["default"] else "") + c["law"], **style)
    if actual:
        lim = [min(actual) * 0.5, max(actual) * 1.8]
        ax1.plot(lim, lim, color="0.5", linewidth=0.8, linestyle="--")
    ax1.set_xlabel("actual FID (held-out runs)")
    ax1.set_ylabel("predicted FID")
    ax1.grid(True, alpha=0.3)
    fig.legend(*ax1.get_legend_handles_labels(), loc="outside lower center", ncol=2, frameon=False)  # off the bars
    best = next(c for c in res["candidates"] if c["default"])
    fitted = forecast.backtest_fit(points, res)
    train = points[~points["name"].isin(res["test"])]
    ax2.axhline(0, color="0.5", linewidth=0.8)
    ax2.scatter(train["compute"], np.log(fitted.predict(forecast._X(train)) / train["fid"]), color="0.3",
                s=25, label="training runs (in-sample)")
    ax2.scatter([points.loc[points["name"] == p["name"], "compute"].iloc[0] for p in best["predictions"]],
                [np.log(p["predicted"] / p["actual"]) for p in best["predictions"]], color="black", marker="D",
                s=45, label="held-out runs")
    ax2.set_xscale("log")
    ax2.set_xlabel("transformer Gflops")
    ax2.set_ylabel("log(predicted / actual)")
    ax2.set_title(f"residuals of the default method: {best['law']}", fontsize=8)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7)
    return fig


def isoflop_figure(co: ComputeOptimal) -> Figure:
    """Left: FID against model Gflops at each training-compute budget (isoFLOP), best marked; right:
    the best model's Gflops against the budget and its log-log fit."""
    fig = Figure(figsize=(9.6, 4.4), dpi=110, layout="constrained")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    fig.suptitle("Compute-optimal view: FID at fixed training compute (read along each run's curve)", fontsize=11)
    cmap = F.plt.get_cmap("viridis")
    for j, b in enumerate(co.budgets):
        col = cmap(j / max(len(co.budgets) - 1, 1))
        ok = np.isfinite(co.fid[:, j])
        ax1.plot(co.gflops[ok], co.fid[ok, j], marker="o", markersize=3, color=col, label=f"{b:.3g}")
        i = co.models.index(co.best[j])
        ax1.scatter([co.gflops[i]], [co.fid[i, j]], s=90, facecolors="none", edgecolors=col, linewidths=1.5)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("model Gflops")
    ax1.set_ylabel("FID")
    ax1.grid(True, alpha=0.3)
    ax1.legend(title="budget (Gflops)", fontsize=6, title_fontsize=7)
    ax2.scatter(co.budgets, co.best_gflops(), color="black", zorder=3, label="best model per budget")
    xs = np.geomspace(co.budgets.min(), co.budgets.max(), 50)
    text = f"not identified: {co.why_not}" if co.why_not else \
        f"slope {co.slope:.2f} [{co.slope_ci[0]:.2f}, {co.slope_ci[1]:.2f}] ({co.level:.0%})"
    if not co.why_not:
        ax2.plot(xs, 10 ** (co.intercept + co.slope * np.log10(xs)), color="black", linewidth=1, label=text)
    else:
        ax2.plot([], [], " ", label=text)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("training compute budget (Gflops)")
    ax2.set_ylabel("Gflops of the best model")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7, loc="upper left")
    return fig


def add_forecast_section(rep: Report, frame: pd.DataFrame, findings: list[list[str]], n_boot: int = 200) -> dict:
    """Back-test, compute-optimal view and next-model forecast into `rep` (figures, tables, notes) and
    rows of the findings table, then the stop-early back-test (harness/report/step_section.py); returns
    {"backtest", "next", "compute_optimal", "stop_early"} (None where not possible)."""
    out: dict = {"backtest": None, "next": None, "compute_optimal": None, "stop_early": None}
    try:
        points, step = forecast.sweep_points(frame)
        if points["name"].nunique() < 4:
            raise HarnessError(f"it needs at least 4 evaluated models at one step (3 to fit, 1 to predict); "
                               f"step {step:,} has {points['name'].nunique()}")
        spec = hold_out_spec(points)
        res = forecast.backtest(points, spec, n_boot=n_boot)
    except HarnessError as err:
        rep.notes.append(f"Forecast back-test not possible: {err}")
        res = None
    if res is not None:
        out["backtest"] = res
        _add_backtest(rep, points, step, spec, res, findings)
        out["next"] = _add_next_forecast(rep, points, findings, n_boot)
    out["compute_optimal"] = co = compute_optimal(frame, n_boot=max(n_boot, 200))
    if co is not None:
        _add_compute_optimal(rep, co, findings)
    out["stop_early"] = add_stop_early_section(rep, frame, findings)
    return out


def _add_backtest(rep: Report, points: pd.DataFrame, step: int, spec: str, res: dict,
                  findings: list[list[str]]) -> None:
    """The back-test's note, findings, figure and table of every candidate law."""
    best = next(c for c in res["candidates"] if c["default"])
    errs = ", ".join(f"{p['name']} {_pct(p['error_pct'])} ({'inside' if p['covered'] else 'outside'} "
                     f"[{p['lo']:.3g}, {p['hi']:.3g}])" for p in best["predictions"])
    rep.notes.append(f"Back-test (step {step:,}): holding out {spec}, the default method (fixed before the data: "
                     f"{res['default']}) fitted to the other runs predicts {errs}. The other "
                     f"{len(res['candidates']) - 1} laws, for comparison only, are in the table 'Forecast back-test'.")
    for p in best["predictions"]:
        findings.append([f"back-test: FID of {p['name']} (held out)", f"{p['predicted']:.3g} vs {p['actual']:.3g}",
                         f"[{p['lo']:.3g}, {p['hi']:.3g}]", "covered" if p["covered"] else "not covered"])
    rep.figures.append(FigureSpec("forecast_backtest", "Forecast back-test",
                                  f"Held-out runs ({spec}) predicted by every eligible law fitted to the other runs, "
                                  f"the default method's with its {res['level']:.0%} prediction intervals; right: "
                                  "its residuals.", backtest_figure(points, res)))
    rows = []
    for c in res["candidates"]:
        params = "; ".join(f"{k} = {v['value']:.3g} [{v['ci'][0]:.3g}, {v['ci'][1]:.3g}]" if isinstance(v, dict)
                           else f"{k}: {v}" for k, v in (c.get("params") or {}).items())
        for p in c["predictions"] or [{}]:
            rows.append([("default: " if c["default"] else "") + c["law"], f"{c['llo_error']:.3f}",
                         f"{c['loo_error']:.3f}", p.get("name", "–"), f"{p['predicted']:.3g}" if p else "–",
                         f"{p['actual']:.3g}" if p else "–", _pct(p.get("error_pct", np.nan)),
                         ("yes" if p["covered"] else "no") if p else "–", c["why_not"] or params])
    rep.tables.append(Table("Forecast back-test", ["law", "llo err", "loo err", "held out", "predicted",
                                                   "actual", "error", f"in {res['level']:.0%} interval",
                                                   "parameters [interval] on the training runs"], rows,
                            "Errors inside the training runs are mean |log(predicted/actual)|, shown for "
                            "comparison: they choose nothing. Intervals: Student's t x the leave-one-model-out "
                            "error x sqrt(1 + leverage), in log FID (harness/study/laws.py)."))


def _add_next_forecast(rep: Report, points: pd.DataFrame, findings: list[list[str]], n_boot: int) -> dict | None:
    """The forecast FID of the next larger model (a note and a findings row), or why there is none."""
    try:
        nxt = forecast.forecast_next(points, n_boot=n_boot)
    except HarnessError as err:
        rep.notes.append(f"No forecast beyond the largest model: {err}")
        return None
    rep.notes.append(f"Forecast for a larger model ({nxt['model']}: {nxt['compute']:.3g} Gflops, "
                     f"{nxt['params'] / 1e6:.3g}M parameters) by {nxt['law']} fitted to all runs: FID "
                     f"{nxt['predicted']:.3g} [{nxt['lo']:.3g}, {nxt['hi']:.3g}] ({nxt['level']:.0%}).")
    findings.append([f"forecast: {nxt['model']}", f"{nxt['predicted']:.3g}",
                     f"[{nxt['lo']:.3g}, {nxt['hi']:.3g}]", nxt["law"]])
    return nxt


def _add_compute_optimal(rep: Report, co: ComputeOptimal, findings: list[list[str]]) -> None:
    """The isoFLOP view: its figure, the slope of the best model's Gflops against the budget, its table."""
    rep.figures.append(FigureSpec("compute_optimal", "Compute-optimal (isoFLOP) view",
                                  "FID at fixed training-compute budgets, interpolated along each model's "
                                  "evaluated checkpoints (never extrapolated); circles: the best model per "
                                  "budget; right: its Gflops against the budget.", isoflop_figure(co)))
    slope = (f"not identified: {co.why_not}" if co.why_not else
             f"{co.slope:.2f} [{co.slope_ci[0]:.2f}, {co.slope_ci[1]:.2f}]")
    rep.notes.append(f"Compute-optimal model size: log10(best model's Gflops) against log10(training compute) "
                     f"has slope {slope} ({co.level:.0%} bootstrap over models); a positive slope means larger "
                     "models use larger budgets better.")
    findings.append(["compute-optimal Gflops vs budget (slope)", "–" if co.why_not else f"{co.slope:.2f}",
                     "–" if co.why_not else f"[{co.slope_ci[0]:.2f}, {co.slope_ci[1]:.2f}]",
                     "not identified" if co.why_not else ("resolved" if co.slope_ci[0] > 0 else
                                                          "not resolved at this budget")])
    rep.tables.append(Table("Compute-optimal: FID at fixed training compute",
                            ["budget (Gflops)"] + co.models + ["best"],
                            [[f"{b:.3g}"] + [f"{v:.3g}" if np.isfinite(v) else "–" for v in co.fid[:, j]]
                             + [co.best[j]] for j, b in enumerate(co.budgets)],
                            "Read along each model's curve between its evaluated checkpoints (linear in log-log); "
                            "'–': the model's run did not reach or starts after that budget."))
