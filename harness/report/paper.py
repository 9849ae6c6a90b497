"""`harness report --paper`: the paper's own Table 4 numbers as a report (the target figures)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.study import analysis, laws
from harness.paper import PAPER_CORRELATION_LOG_GFLOPS_FID, PAPER_GLOBAL_BATCH, headline, table4, train_compute
from harness.report import figures as F
from harness.report.render import FigureSpec, Report, Table, write_report



def paper_frame() -> pd.DataFrame:
    """Table 4 as a tidy table in the harness's columns (one row per published FID-50K)."""
    rows = []
    for r in table4():
        rows.append({
            "run_id": f"{r['model']}|{r['conditioning']}|{r['image_size']}px|{r['train_steps']}",
            "model": r["model"], "size": r["size"], "patch": r["patch"], "depth": r["depth"],
            "hidden": r["hidden"], "conditioning": r["conditioning"], "seed": 0, "dataset": "imagenet",
            "image_size": r["image_size"], "num_classes": 1000, "global_batch": PAPER_GLOBAL_BATCH,
            "step": r["train_steps"], "gflops": float(r["gflops"]), "params": r["params_m"] * 1e6,
            "tokens": float((r["image_size"] // 8 // r["patch"]) ** 2),
            "train_compute": train_compute(r["gflops"], PAPER_GLOBAL_BATCH, r["train_steps"]),
            "sampling_steps": 250, "sampler": "ddpm", "cfg_scale": 1.0, "guidance_channels": None,
            "feature_space": "inception", "reference": "ADM ImageNet 256 train", "num_samples": 50000,
            "fid": float(r["fid50k"]), "sfid": np.nan, "inception_score": np.nan, "precision": np.nan,
            "recall": np.nan, "fid_se": np.nan, "train_wall_s": np.nan, "eval_wall_s": np.nan,
        })
    return pd.DataFrame(rows)


def scaling_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The 12 adaLN-Zero models at 256px and 400K steps (the paper's scaling figure)."""
    sel = frame[(frame["conditioning"] == "adaLN-Zero") & (frame["image_size"] == 256) & (frame["step"] == 400000)]
    out = sel.copy()
    out["label"] = out["model"]
    return out


def train_compute_figure(frame: pd.DataFrame, fit: laws.PowerLawFit) -> Figure:
    """FID-50K vs training compute (Gflops x 256 x steps x 3), with the long DiT-XL/2 runs."""
    fig, ax = F._new("Paper: FID-50K vs training compute (256px)",
                     "training compute (Gflops = model Gflops × 256 × steps × 3)", "FID-50K")
    ax.set_xscale("log")
    ax.set_yscale("log")
    seen: list = []
    scal = scaling_rows(frame).sort_values("gflops")
    for _, r in scal.iterrows():
        st = F.style_for(r["size"], r["patch"], seen)
        ax.scatter([r["train_compute"]], [r["fid"]], color=st["color"], marker=st["marker"], s=45, zorder=3,
                   label=f"{r['model']} (400K)")
    long = frame[(frame["model"] == "DiT-XL/2") & (frame["conditioning"] == "adaLN-Zero")
                 & (frame["image_size"] == 256)].sort_values("step")
    ax.plot(long["train_compute"], long["fid"], color=F.SIZE_COLOURS["XL"], linewidth=1.2, marker="o",
            markersize=4, label="DiT-XL/2: 400K, 2.35M, 7M steps")
    xs = np.geomspace(scal["train_compute"].min() / 1.5, long["train_compute"].max() * 1.2, 100)
    ax.plot(xs, fit.predict(xs), color="black", linewidth=1, linestyle="--",
            label=f"fit over the 400K points: {fit.a:.3g}·C^{fit.b:.3f}")
    F._legend(ax, loc="lower left")
    return fig


def build_paper_report(n_boot: int = 1000) -> Report:
    frame = paper_frame()
    scal = scaling_rows(frame)
    corr = analysis.correlation(scal["gflops"].to_numpy(), scal["fid"].to_numpy(), "fid", "gflops", 400000)
    gfit = laws.power_law(scal["gflops"], scal["fid"], n_boot=n_boot)
    cfit = laws.power_law(scal["train_compute"], scal["fid"], n_boot=n_boot)
    rep = Report(title="DiT scaling: the paper's Table 4 (Peebles & Xie 2023)", name="paper",
                 csv_name="table4_tidy.csv", csv_text=frame.to_csv(index=False))
    rep.notes += [
        f"Pearson correlation between log10(transformer Gflops) and FID-50K over the {corr.n} adaLN-Zero models "
        f"of Table 4 (256px, 400K steps): r = {corr.pearson_r:.3f} (p = {corr.pearson_p:.2g}); the paper reports "
        f"{PAPER_CORRELATION_LOG_GFLOPS_FID}. Spearman ρ = {corr.spearman_rho:.3f}. Computed by "
        "scipy.stats.pearsonr on log10(Gflops) and FID-50K as published.",
        f"Power-law fit FID ≈ {gfit.a:.3g}·G^{gfit.b:.3f} (95% bootstrap CI of the exponent "
        f"[{gfit.b_ci[0]:.3f}, {gfit.b_ci[1]:.3f}], R² in log space {gfit.r2:.3f}).",
        "Training compute = model Gflops × batch 256 × steps × 3 (the backward pass costs two forward passes).",
    ]
    rep.headline = "fid_vs_gflops"
    rep.findings = Table("The paper's scaling result, recomputed", ["finding", "value", "interval", "resolved?",
                                                                    "figure"], [
        [f"FID-50K falls as model Gflops grow: correlation over the {corr.n} models at 400K steps",
         f"r = {corr.pearson_r:.3f} (Spearman ρ = {corr.spearman_rho:.3f})", f"p = {corr.pearson_p:.2g}",
         "yes: p < 0.05" if corr.pearson_p < 0.05 else "no: p ≥ 0.05", "fid_vs_gflops"],
        ["Exponent b of FID-50K ∝ Gflops^b", f"b = {gfit.b:.3f}",
         f"[{gfit.b_ci[0]:.3f}, {gfit.b_ci[1]:.3f}] (95%)", "yes: b < 0" if gfit.b_ci[1] < 0 else
         "no: the interval reaches 0", "fid_vs_gflops"],
        ["Exponent of FID-50K against training compute (400K-step models)", f"b = {cfit.b:.3f}",
         f"[{cfit.b_ci[0]:.3f}, {cfit.b_ci[1]:.3f}] (95%)", "yes: b < 0" if cfit.b_ci[1] < 0 else
         "no: the interval reaches 0", "fid_vs_train_compute"]],
        f"The paper reports r = {PAPER_CORRELATION_LOG_GFLOPS_FID}. Intervals: percentile bootstrap over the 12 "
        "models. Computed from Table 4's FID-50K as published.")
    rep.figures.append(FigureSpec("fid_vs_gflops", "FID-50K vs transformer Gflops (paper, Table 4)",
                                  "The 12 adaLN-Zero DiT models at 400K steps, 256px; colour = size, marker = patch; "
                                  "black: power-law fit with its 95% bootstrap band.",
                                  F.fid_vs_gflops(scal, corr, gfit, 400000,
                                                  title="Paper: FID-50K vs transformer Gflops (400K steps)")))
    rep.figures.append(FigureSpec("fid_vs_train_compute", "FID-50K vs training compute (paper, Table 4)",
                                  "400K-step models and the long DiT-XL/2 runs; dashed: power law over the "
                                  "400K points.", train_compute_figure(frame, cfit)))
    abl = [r for r in table4() if r["model"] == "DiT-XL/2" and r["image_size"] == 256 and r["train_steps"] == 400000]
    rep.figures.append(FigureSpec("conditioning", "Conditioning block ablation (paper, Table 4)",
                                  "DiT-XL/2 at 400K steps, 256px; labels: FID-50K and Gflops.",
                                  F.conditioning_bars(abl, "Paper: conditioning blocks, DiT-XL/2 at 400K steps"),
                                  section="ablations"))
    cols = ["model", "conditioning", "image_size", "gflops", "params_m", "train_steps", "fid50k"]
    rep.tables.append(Table("Table 4", cols, [[str(r[c]) for c in cols] for r in table4()]))
    hcols = list(headline()[0].keys())
    rep.tables.append(Table("Tables 2-3: DiT-XL/2, 250 DDPM steps", hcols,
                            [[str(r[c]) for c in hcols] for r in headline()]))
    rep.tables.append(Table("Fits", ["data", "form", "scale", "exponent [95% CI]", "points", "R² (log)"], [
        ["FID-50K vs Gflops (400K)", gfit.form, f"a = {gfit.a:.4g}",
         f"b = {gfit.b:.4f} [{gfit.b_ci[0]:.4f}, {gfit.b_ci[1]:.4f}]", str(gfit.n), f"{gfit.r2:.3f}"],
        ["FID-50K vs training compute (400K)", cfit.form, f"a = {cfit.a:.4g}",
         f"b = {cfit.b:.4f} [{cfit.b_ci[0]:.4f}, {cfit.b_ci[1]:.4f}]", str(cfit.n), f"{cfit.r2:.3f}"],
    ], "Bootstrap over the 12 models (percentile, 95%)."))
    rep.provenance = Table("Metrics", ["metric", "feature space", "reference", "samples", "sampling"],
                           [["FID-50K", "inception", "ADM ImageNet 256 train", "50000", "DDPM 250 steps, no guidance"]],
                           "As published (Table 4); not recomputed by this harness.")
    return rep


def render_paper_report(out_root: str | Path, n_boot: int = 1000) -> dict:
    """Write reports/paper/ from the paper's Table 4; returns the manifest."""
    rep = build_paper_report(n_boot=n_boot)
    manifest = write_report(rep, out_root)
    return manifest
