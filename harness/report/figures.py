"""The report's figures (matplotlib, Agg), in the style of the paper's scaling plots.

Each function takes the tidy frame (harness.study.results) or analysis objects and returns a Figure;
`save_figure` writes it as PNG and SVG atomically. Colour encodes model size, line style the patch.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text in the SVGs (smaller, faster)
# Figures are drawn at their printed size (at most PRINT_WIDTH_IN wide on A4/Letter) with no text below
# MIN_FONT_PT, so the PDF shows them 1:1 and every label stays readable.
PRINT_WIDTH_IN = 7.0
MIN_FONT_PT = 8.0
matplotlib.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
                            "ytick.labelsize": 8, "legend.fontsize": 8, "legend.title_fontsize": 8,
                            "figure.titlesize": 10})
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from harness.study import analysis, laws  # noqa: E402
from harness.io import atomic_write  # noqa: E402
from harness.study.results import METRICS, default_setting, main_conditioning  # noqa: E402

log = logging.getLogger(__name__)

SIZE_COLOURS = {"S": "#4C72B0", "B": "#55A868", "L": "#DD8452", "XL": "#C44E52"}
EXTRA_COLOURS = ["#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]
PATCH_STYLES = {2: "-", 4: "--", 8: ":"}
PATCH_MARKERS = {2: "o", 4: "s", 8: "^"}
COND_COLOURS = {"in-context": "#8172B3", "cross-attention": "#DD8452", "adaLN": "#55A868", "adaLN-Zero": "#C44E52"}
FIGSIZE = (PRINT_WIDTH_IN, 3.9)
Z90 = 1.645  # half-width of a 90% normal interval in standard errors (the findings' convention)
PAPER_STYLE = dict(color="black", marker="*", s=90, facecolors="none", linewidths=1.0, zorder=5)


def style_for(size, patch, sizes_seen: list) -> dict:
    """Line colour by size (S/B/L/XL as in the paper; other sizes from a fixed palette), style by patch."""
    colour = SIZE_COLOURS.get(str(size))
    if colour is None:
        if size not in sizes_seen:
            sizes_seen.append(size)
        colour = EXTRA_COLOURS[sizes_seen.index(size) % len(EXTRA_COLOURS)]
    p = int(patch) if patch is not None and not pd.isna(patch) else 2
    return {"color": colour, "linestyle": PATCH_STYLES.get(p, "-."), "marker": PATCH_MARKERS.get(p, "D")}


def _model_order(frame: pd.DataFrame) -> list[str]:
    info = frame.groupby("model")["gflops"].mean().sort_values()
    return list(info.index)


def _new(title: str, xlabel: str, ylabel: str) -> tuple[Figure, plt.Axes]:
    fig = Figure(figsize=FIGSIZE, dpi=110, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axisbelow(True)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def _legend(ax, outside: bool = True, **kw) -> None:
    """Legend to the right of the axes (never over the data), or inside at `loc`."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if outside:
        kw.pop("loc", None)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  ncol=2 if len(handles) > 16 else 1, frameon=False)
    else:
        ax.legend(framealpha=0.85, **kw)


def fid_vs_steps(frame: pd.DataFrame, metric: str = "fid", paper_rows: list[dict] | None = None) -> Figure:
    """Metric against training steps, one line per model (default sampling setting, seed mean)."""
    cond = main_conditioning(frame)
    rows = default_setting(frame)
    rows = rows[(rows["conditioning"] == cond) & rows[metric].notna()]
    fig, ax = _new(f"{METRICS[metric]} vs training steps ({cond})", "training steps", METRICS[metric])
    seen: list = []
    for model in _model_order(rows):
        g = rows[rows["model"] == model]
        m = g.groupby("step")[metric].agg(["mean", "min", "max"])
        st = style_for(g["size"].iloc[0], g["patch"].iloc[0], seen)
        ax.plot(m.index, m["mean"], label=model, markersize=4, **st)
        if g["seed"].nunique() > 1:
            ax.fill_between(m.index, m["min"], m["max"], color=st["color"], alpha=0.15, linewidth=0)
        err = _se_bars(g, "step", metric)
        if err is not None:
            ax.errorbar(m.index, m["mean"], yerr=err.reindex(m.index).to_numpy(), fmt="none",
                        ecolor=st["color"], capsize=2, linewidth=0.8)
    if paper_rows:
        ax.scatter([r["train_steps"] for r in paper_rows], [r["fid50k"] for r in paper_rows],
                   label="paper, Table 4 (FID-50K)", **PAPER_STYLE)
    _legend(ax)
    return fig


def _se_bars(g: pd.DataFrame, by: str, metric: str) -> pd.Series | None:
    """± Z90 x FID's bootstrap standard error (over samples) per `by` value, seed-averaged; None without."""
    if metric != "fid" or "fid_se" not in g or g["fid_se"].isna().all():
        return None
    return Z90 * g.groupby(by)["fid_se"].mean() / np.sqrt(g.groupby(by)["seed"].nunique())


def uncertainty_caption(frame: pd.DataFrame) -> str:
    """What the bars and bands of a FID-vs-steps curve are, for this data (one home for the wording)."""
    seeds = int(frame.groupby("model")["seed"].nunique().max()) if len(frame) else 0
    parts = []
    if "fid_se" in frame and frame["fid_se"].notna().any():
        parts.append("bars: 90% interval of each FID (± 1.645 bootstrap standard errors over the samples)")
    if seeds > 1:
        parts.append(f"shaded: range over {seeds} seeds")
    text = "; ".join(parts)
    return (text[:1].upper() + text[1:] + ".") if parts else "One seed and no standard error recorded: no bars."


def fid_vs_gflops(models: pd.DataFrame, corr: analysis.Correlation | None, fit: laws.PowerLawFit | None,
                  step: int | None, metric: str = "fid", paper_rows: list[dict] | None = None,
                  title: str | None = None) -> Figure:
    """One point per model at one step; log x; the power-law fit and the correlation in the legend."""
    fig, ax = _new(title or f"{METRICS[metric]} vs transformer Gflops (step {step:,})",
                   "transformer Gflops (forward pass, one image)", METRICS[metric])
    ax.set_xscale("log")
    seen: list = []
    for _, r in models.sort_values("gflops").iterrows():
        st = style_for(r["size"], r["patch"], seen)
        ax.scatter([r["gflops"]], [r[metric]], color=st["color"], marker=st["marker"], s=45, zorder=3,
                   label=r["label"])
        if metric == "fid" and np.isfinite(r.get("fid_se", np.nan)):
            ax.errorbar([r["gflops"]], [r[metric]], yerr=[Z90 * r["fid_se"]], fmt="none", ecolor=st["color"],
                        capsize=3, linewidth=1, zorder=3)
    if fit is not None:
        xs = np.geomspace(models["gflops"].min() / 1.3, models["gflops"].max() * 1.3, 100)
        lo, hi = fit.interval(xs)
        ax.plot(xs, fit.predict(xs), color="black", linewidth=1.2,
                label=f"fit {fit.a:.3g}·G^{fit.b:.3f} {analysis.ci_text(fit.b_ci)}")
        if np.all(np.isfinite(lo)):
            ax.fill_between(xs, lo, hi, color="black", alpha=0.08, linewidth=0)
    if paper_rows:
        ax.scatter([r["gflops"] for r in paper_rows], [r["fid50k"] for r in paper_rows],
                   label="paper, Table 4 (400K steps)", **PAPER_STYLE)
    if corr is not None and np.isfinite(corr.pearson_r):
        ax.text(0.98, 0.97, f"Pearson r(log Gflops, {METRICS[metric]}) = {corr.pearson_r:.3f}\n"
                f"Spearman ρ = {corr.spearman_rho:.3f}   (n = {corr.n})",
                transform=ax.transAxes, ha="right", va="top", fontsize=9,
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.9, edgecolor="0.7"))
    _legend(ax, loc="lower left")
    return fig


def fid_vs_train_compute(frame: pd.DataFrame, front: analysis.Frontier | None, fit: laws.PowerLawFit | None,
                         extrap: analysis.Extrapolation | None, metric: str = "fid",
                         paper_points: list[tuple[str, float, float]] | None = None) -> Figure:
    """Log-log metric against training compute per model, the frontier, its fit and extrapolation."""
    cond = main_conditioning(frame)
    rows = default_setting(frame)
    rows = rows[(rows["conditioning"] == cond) & rows[metric].notna()]
    fig, ax = _new(f"{METRICS[metric]} vs training compute ({cond})",
                   "training compute (Gflops = model Gflops × batch × steps × 3)", METRICS[metric])
    ax.set_xscale("log")
    ax.set_yscale("log")
    seen: list = []
    for model in _model_order(rows):
        g = rows[rows["model"] == model]
        m = g.groupby("train_compute")[metric].mean()
        st = style_for(g["size"].iloc[0], g["patch"].iloc[0], seen)
        ax.plot(m.index, m.values, label=model, markersize=3.5, alpha=0.9, **st)
        err = _se_bars(g, "train_compute", metric)
        if err is not None:
            ax.errorbar(m.index, m.values, yerr=err.reindex(m.index).to_numpy(), fmt="none", ecolor=st["color"],
                        capsize=2, linewidth=0.8, alpha=0.9)
    if front is not None:
        gx, gy = monotone_frontier(front)
        ax.plot(gx, gy, color="black", linewidth=3, alpha=0.25, label="compute-efficient frontier", zorder=1)
    if fit is not None:
        hi_x = max(front.grid.max() if front is not None else 0, extrap.target if extrap else 0)
        xs = np.geomspace(front.grid.min() if front is not None else hi_x / 100, hi_x, 100)
        ax.plot(xs, fit.predict(xs), color="black", linewidth=1,
                label=f"frontier fit {fit.a:.3g}·C^{fit.b:.3f} {analysis.ci_text(fit.b_ci)}")
    if extrap is not None and np.isfinite(extrap.value):
        yerr = None
        if np.isfinite(extrap.lo):
            yerr = [[max(extrap.value - extrap.lo, 0)], [max(extrap.hi - extrap.value, 0)]]
        ax.errorbar([extrap.target], [extrap.value], yerr=yerr, fmt="D", color="black", capsize=4,
                    label=f"extrapolation to {extrap.target:.3g}: {extrap.value:.3g}")
    if paper_points:
        ax.scatter([p[1] for p in paper_points], [p[2] for p in paper_points],
                   label="paper, Table 4 (batch 256, 400K steps)", **PAPER_STYLE)
    _legend(ax, loc="lower left")
    return fig


def monotone_frontier(front: analysis.Frontier) -> tuple[np.ndarray, np.ndarray]:
    """The frontier as drawn: the best FID reachable with at most C (a running minimum over the grid),
    so it never rises where a larger model's first checkpoint is worse than a smaller one's last."""
    ok = np.isfinite(front.best_value)
    return front.grid[ok], np.minimum.accumulate(front.best_value[ok])


def ablation_model(frame: pd.DataFrame) -> str:
    """The model trained with the most conditioning blocks (the ablation's)."""
    return str(frame.groupby("model")["conditioning"].nunique().idxmax())


def conditioning_ablation(frame: pd.DataFrame, metric: str = "fid", paper_rows: list[dict] | None = None) -> Figure:
    """Left: metric vs steps per conditioning block; right: the last step's metric as bars."""
    rows = default_setting(frame)
    rows = rows[rows[metric].notna()]
    model = ablation_model(rows)
    rows = rows[rows["model"] == model]
    fig = Figure(figsize=(PRINT_WIDTH_IN, 3.6), dpi=110, layout="constrained")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    fig.suptitle(f"Conditioning block ablation ({model})")
    last, last_err = {}, {}
    for cond, g in rows.groupby("conditioning"):
        m = g.groupby("step")[metric].mean()
        ax1.plot(m.index, m.values, marker="o", markersize=3.5, color=COND_COLOURS.get(cond), label=cond)
        err = _se_bars(g, "step", metric)
        if err is not None:
            ax1.errorbar(m.index, m.values, yerr=err.reindex(m.index).to_numpy(), fmt="none",
                         ecolor=COND_COLOURS.get(cond), capsize=2, linewidth=0.8)
        last[cond] = m.iloc[-1]
        last_err[cond] = float(err.iloc[-1]) if err is not None else np.nan
    ax1.set_xlabel("training steps")
    ax1.set_ylabel(METRICS[metric])
    ax1.grid(True, alpha=0.3)
    _legend(ax1, outside=False)
    names = [c for c in COND_COLOURS if c in last] + [c for c in last if c not in COND_COLOURS]
    xs = np.arange(len(names))
    width = 0.38 if paper_rows else 0.6
    errs = [last_err[c] for c in names]
    ax2.bar(xs - (width / 2 if paper_rows else 0), [last[c] for c in names], width,
            yerr=errs if np.all(np.isfinite(errs)) else None, capsize=4,
            color=[COND_COLOURS.get(c, "0.5") for c in names], label="this sweep (last step)")
    if paper_rows:
        paper = {r["conditioning"]: r["fid50k"] for r in paper_rows}
        ax2.bar(xs + width / 2, [paper.get(c, np.nan) for c in names], width, color="white",
                edgecolor="black", hatch="//", label="paper, Table 4 (400K)")
    ax2.set_xticks(xs, names, rotation=20, ha="right")
    ax2.set_ylabel(METRICS[metric])
    ax2.grid(True, axis="y", alpha=0.3)
    ax2.set_axisbelow(True)
    _legend(ax2, outside=False)
    return fig


def conditioning_bars(rows: list[dict], title: str) -> Figure:
    """Bars of FID per conditioning block from plain rows (the paper's Table 4 ablation)."""
    fig, ax = _new(title, "conditioning block", "FID-50K")
    names = [c for c in COND_COLOURS if any(r["conditioning"] == c for r in rows)]
    vals = [next(r["fid50k"] for r in rows if r["conditioning"] == c) for c in names]
    gfl = [next(r["gflops"] for r in rows if r["conditioning"] == c) for c in names]
    bars = ax.bar(names, vals, color=[COND_COLOURS[c] for c in names])
    for b, v, g in zip(bars, vals, gfl):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}\n{g:.1f} Gflops", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(vals) * 1.25)
    return fig


def sampling_compute(study: pd.DataFrame, metric: str = "fid") -> Figure:
    """Metric against sampling compute (Gflops x steps, x2 with guidance), one line per model/cfg."""
    fig, ax = _new(f"{METRICS[metric]} vs sampling compute (last checkpoint)",
                   "sampling compute (Gflops per image = model Gflops × steps × (2 with guidance))",
                   METRICS[metric])
    ax.set_xscale("log")
    seen: list = []
    for (label, cfg), g in study[study[metric].notna()].groupby(["label", "cfg_scale"], dropna=False):
        m = g.groupby("sampling_compute")[metric].mean()
        st = style_for(g["size"].iloc[0], g["patch"].iloc[0], seen)
        guided = not (pd.isna(cfg) or np.isclose(cfg, 1.0))
        name = f"{label}, cfg {cfg:g}" if guided else label
        if guided:  # open markers, dotted: the guided (2x compute) setting of the same model
            st = {**st, "linestyle": ":", "markerfacecolor": "white"}
        ax.plot(m.index, m.values, label=name, markersize=5 if guided else 4, **st)
        for x, steps in zip(g["sampling_compute"], g["sampling_steps"]):
            ax.annotate(f"{int(steps)}", (x, g.loc[g["sampling_compute"] == x, metric].mean()),
                        fontsize=MIN_FONT_PT, xytext=(2, 2), textcoords="offset points", color=st["color"])
    _legend(ax)
    return fig


def sample_grids(grids: list[tuple[str, Path | np.ndarray]]) -> Figure:
    """Image grids side by side, four per row, each titled (a real-data grid first when there is one)."""
    n = len(grids)
    cols = min(4, n)
    nrows = int(np.ceil(n / cols))
    fig = Figure(figsize=(PRINT_WIDTH_IN * cols / 4, 2.1 * nrows + 0.3), dpi=110, layout="constrained")
    fig.suptitle("Real training images and samples (newest grid per run)")
    for i, (title, image) in enumerate(grids):
        ax = fig.add_subplot(nrows, cols, i + 1)
        img = plt.imread(str(image)) if isinstance(image, (str, Path)) else image
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        ax.set_title(title, fontsize=MIN_FONT_PT)
        ax.axis("off")
    return fig


SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def log_tick_label(value: float, _pos=None) -> str:
    """'0.5', '20', '2×10⁵': plain numbers from 0.001 to 10,000, else powers of ten with a Unicode
    exponent (mathtext would draw the exponent at 70% of the font size, under MIN_FONT_PT)."""
    if value <= 0 or not np.isfinite(value):
        return ""
    if 1e-3 <= value < 1e4:
        return f"{value:g}"
    k = int(np.floor(np.log10(value) + 1e-9))
    m = value / 10 ** k
    return ("" if abs(m - 1) < 1e-9 else f"{m:g}×") + "10" + str(k).translate(SUPERSCRIPT)


def _readable_log_ticks(ax) -> None:
    """Log axes: labels at 1, 2, 5 × 10^k when the axis spans under two decades, else at powers of ten
    only; never labelled minor ticks (they overlapped)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        if axis.get_scale() != "log" or lo <= 0 or hi <= 0:
            continue
        decades = abs(np.log10(hi) - np.log10(lo))
        axis.set_major_locator(LogLocator(subs=(1.0,) if decades >= 2 else (1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(log_tick_label))
        axis.set_minor_formatter(NullFormatter())


def print_ready(fig: Figure) -> Figure:
    """At most PRINT_WIDTH_IN wide (aspect kept; constrained layout reflows), log ticks that neither
    overlap nor shrink, and no text under MIN_FONT_PT, so a figure printed 1:1 in the PDF is readable
    (also guards figures drawn elsewhere)."""
    for ax in fig.axes:
        _readable_log_ticks(ax)
    w, h = fig.get_size_inches()
    if w > PRINT_WIDTH_IN:
        fig.set_size_inches(PRINT_WIDTH_IN, h * PRINT_WIDTH_IN / w)
    for text in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "set_fontsize")):
        if text.get_fontsize() < MIN_FONT_PT:
            text.set_fontsize(MIN_FONT_PT)
    return fig


def save_figure(fig: Figure, folder: Path, name: str) -> list[Path]:
    """Write NAME.png and NAME.svg into `folder` atomically; returns the paths."""
    out = []
    print_ready(fig)
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=130 if ext == "png" else None)  # constrained layout: no clipping
        data = buf.getvalue()
        out.append(atomic_write(folder / f"{name}.{ext}", lambda f, d=data: f.write(d), mode="wb"))
    return out
