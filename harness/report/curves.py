"""Figures of how training went: loss curves from train.jsonl, every metric against steps or compute."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.report.figures import COND_COLOURS, PRINT_WIDTH_IN, _model_order, _se_bars, main_conditioning, style_for
from harness.study.results import METRICS, default_setting

LOSS_TERMS = {"loss": "loss (mse + vb)", "mse": "mse (noise prediction)", "vb": "vb (variational bound)"}
SMOOTH_FRACTION = 0.1  # the smoothing window: a tenth of a run's log lines (at least 3)
X_AXES = {"step": ("training steps", "linear"),
          "train_compute": ("training compute (Gflops)", "log")}


def smooth(values: pd.Series) -> pd.Series:
    """An exponential moving average over SMOOTH_FRACTION of the points (span >= 3)."""
    return values.ewm(span=max(3, int(len(values) * SMOOTH_FRACTION)), adjust=False).mean()


def _run_styles(runs: list[dict]) -> dict[str, dict]:
    """run_id -> line style (colour by size, dash by patch), in Gflops order; other blocks dash-dotted."""
    seen: list = []
    out = {}
    for run in sorted(runs, key=lambda r: (float(r.get("gflops") or 0), r.get("run_id", ""))):
        st = style_for(run.get("size"), run.get("patch"), seen)
        if run.get("conditioning") != "adaLN-Zero":  # the ablation's blocks: their own colours
            st = {**st, "linestyle": "-.", "color": COND_COLOURS.get(run.get("conditioning"), st["color"])}
        out[run.get("run_id", "")] = st
    return out


def run_label(run: dict) -> str:
    return f"{run.get('model')} {run.get('conditioning')}" + (f" s{run['seed']}" if run.get("seed") else "")


def loss_curves(train_logs: dict[str, pd.DataFrame], runs: list[dict]) -> Figure:
    """loss, mse and vb against steps, one line per run: smoothed solid, the logged values faint."""
    terms = [t for t in LOSS_TERMS if any(t in log and log[t].notna().any() for log in train_logs.values())]
    fig = Figure(figsize=(PRINT_WIDTH_IN, 3.6), dpi=110, layout="constrained")
    axes = [fig.add_subplot(1, len(terms), i + 1) for i in range(len(terms))]
    fig.suptitle("Training loss per run (train.jsonl)")
    styles = _run_styles(runs)
    by_id = {r.get("run_id"): r for r in runs}
    for ax, term in zip(axes, terms):
        for rid in styles:
            log = train_logs.get(rid)
            if log is None or term not in log:
                continue
            g = log[["step", term]].dropna()
            g = g[g[term] > 0]
            if g.empty:
                continue
            st = styles[rid]
            ax.plot(g["step"], g[term], color=st["color"], linewidth=0.8, alpha=0.25)
            ax.plot(g["step"], smooth(g[term]), color=st["color"], linestyle=st["linestyle"], linewidth=1.4,
                    label=run_label(by_id[rid]))
        ax.set_yscale("log")
        ax.set_title(LOSS_TERMS[term])
        ax.set_xlabel("training steps")
        ax.grid(True, which="major", alpha=0.3)
    if axes:
        axes[0].set_ylabel("per-step mean (log scale)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(3, max(len(labels), 1)), frameon=False)
    return fig


def metric_curves(frame: pd.DataFrame, x: str = "step") -> Figure:
    """FID, sFID, IS, precision and recall against `x` (steps or training compute), one line per model of
    the main conditioning block in the default sampling setting (seed mean); FID with its bars."""
    cond = main_conditioning(frame)
    rows = default_setting(frame)
    rows = rows[rows["conditioning"] == cond]
    metrics = [m for m in METRICS if rows[m].notna().any()]
    label, scale = X_AXES[x]
    ncols = 3
    nrows = int(np.ceil((len(metrics) + 1) / ncols))
    fig = Figure(figsize=(PRINT_WIDTH_IN, 2.0 * nrows + 0.4), dpi=110, layout="constrained")  # two fit an A4 page
    fig.suptitle(f"Every metric against {label} ({cond})")
    seen: list = []
    handles: dict = {}
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for model in _model_order(rows):
            g = rows[(rows["model"] == model) & rows[metric].notna()]
            if g.empty:
                continue
            m = g.groupby(x)[metric].mean()
            st = style_for(g["size"].iloc[0], g["patch"].iloc[0], seen)
            (line,) = ax.plot(m.index, m.values, markersize=3.5, **st)
            handles.setdefault(model, line)
            err = _se_bars(g, x, metric)
            if err is not None:
                ax.errorbar(m.index, m.values, yerr=err.reindex(m.index).to_numpy(), fmt="none",
                            ecolor=st["color"], capsize=2, linewidth=0.8)
        ax.set_xscale(scale)
        ax.set_title(METRICS[metric])
        ax.set_xlabel(label if scale == "linear" else "training compute (Gflops)")
        ax.grid(True, which="major", alpha=0.3)
    legend_ax = fig.add_subplot(nrows, ncols, len(metrics) + 1)
    legend_ax.axis("off")
    legend_ax.legend(list(handles.values()), list(handles.keys()), loc="center", frameon=False,
                     title="model (colour: size, line: patch)")
    return fig
