"""The report's "stop early?" back-test: each run's FID at its last evaluated step forecast from its
earlier checkpoints (harness.study.step_forecast), against the truth. Self-contained: one figure function
and one section function, called from the forecast section."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.study import step_forecast
from harness.errors import HarnessError
from harness.report.figures import PRINT_WIDTH_IN
from harness.report.render import FigureSpec, Report, Table


def stop_early_figure(res: dict) -> Figure:
    """One panel per run: the observed curve (filled: checkpoints the forecast used), the joint
    forecast to the target step with its interval, and the truth there."""
    runs = res["runs"]
    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig = Figure(figsize=(PRINT_WIDTH_IN * cols / 3, 1.7 * rows + 0.5), dpi=110, layout="constrained")  # printed 1:1
    fig.suptitle(f"Stop early? FID at step {res['at_step']:,} forecast from steps <= {res['from_steps']:,} "
                 f"({res['level']:.0%} intervals)", fontsize=10)
    fit = res["fit"]
    for i, r in enumerate(runs):
        ax = fig.add_subplot(rows, cols, i + 1)
        steps, fids = np.array(r["steps"], float), np.array(r["fids"], float)
        used = steps <= res["from_steps"]
        ax.plot(steps, fids, color="0.6", linewidth=0.8)
        ax.scatter(steps[used], fids[used], color="black", s=18, zorder=3, label="used")
        ax.scatter(steps[~used], fids[~used], facecolors="none", edgecolors="black", s=22, zorder=3, label="not used")
        xs = np.geomspace(steps.min(), res["at_step"], 40)
        ax.plot(xs, fit.predict(np.full(len(xs), i), xs), color="tab:blue", linewidth=1, label="forecast")
        if np.isfinite(r["lo"]):
            ax.errorbar([res["at_step"]], [r["predicted"]], yerr=[[r["predicted"] - r["lo"]], [r["hi"] - r["predicted"]]],
                        color="tab:blue", marker="D", markersize=5, capsize=3)
        if np.isfinite(r["actual"]):
            ax.scatter([res["at_step"]], [r["actual"]], marker="*", s=90, color="tab:red", zorder=4, label="truth")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{r['label']}: {r['error_pct']:+.1f}%" if np.isfinite(r["error_pct"]) else r["label"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6)
    return fig


def add_stop_early_section(rep: Report, frame: pd.DataFrame, findings: list[list[str]]) -> dict | None:
    """Back-test on the sweep's own checkpoints: the last evaluated step from the earlier ones. None
    (and a note) when the runs have fewer than 3 evaluated steps."""
    steps = sorted(step_forecast.curves_of(frame)["step"].unique().tolist())
    if len(steps) < 3:
        rep.notes.append(f"No stop-early back-test: it needs 3 evaluated steps (2 to fit, 1 to check); the runs have "
                         f"{len(steps)}.")
        return None
    try:
        res = step_forecast.step_forecast(frame, int(steps[-1]), int(steps[-2]))
    except HarnessError as err:
        rep.notes.append(f"No stop-early back-test: {err}")
        return None
    judged = [r for r in res["runs"] if r["covered"] is not None]
    errs = np.abs([r["error_pct"] for r in judged])
    rep.notes.append(f"Stop early? Each run's FID at step {res['at_step']:,} forecast from its checkpoints up to step "
                     f"{res['from_steps']:,} (joint {res['form']} curves in log FID, one shared exponent): median "
                     f"error {np.median(errs):.1f}%, largest {errs.max():.1f}%; {res['coverage']:.0%} of the truths "
                     f"inside their {res['level']:.0%} intervals.")
    findings.append([f"stop early: FID at step {res['at_step']:,} from steps <= {res['from_steps']:,}",
                     f"median error {np.median(errs):.1f}%", f"{res['coverage']:.0%} covered", res["form"]])
    rep.figures.append(FigureSpec("stop_early", "Stop early?",
                                  "Each run's evaluated FID (filled: the checkpoints the forecast used), the joint "
                                  f"forecast to step {res['at_step']:,} with its {res['level']:.0%} interval (diamond) "
                                  "and the truth (star).", stop_early_figure(res)))
    rep.tables.append(Table("Stop early: forecast of the last evaluated step",
                            ["run", "used steps", "predicted", f"{res['level']:.0%} interval", "actual", "error",
                             "covered", "run alone"],
                            [[r["label"], ", ".join(f"{s:,}" for s in r["fit_steps"]), f"{r['predicted']:.3g}",
                              f"[{r['lo']:.3g}, {r['hi']:.3g}]", f"{r['actual']:.3g}", f"{r['error_pct']:+.1f}%",
                              "yes" if r["covered"] else "no", f"{r['alone']['predicted']:.3g}"] for r in judged],
                            "Joint fit: one exponent shared by all runs (harness/study/step_forecast.py); 'run alone': "
                            "the run's own curve without the others, for comparison."))
    return res
