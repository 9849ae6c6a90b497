"""The report of one sweep: analyses of its tidy table, turned into figures, tables and notes."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from harness import analysis
from harness.errors import HarnessError
from harness.paper import PAPER_GLOBAL_BATCH, table4, train_compute
from harness.report import figures as F
from harness.report.render import FigureSpec, Report, Table, write_report
from harness.results import METRICS, SweepResults, default_setting, load_sweep

log = logging.getLogger(__name__)

EXTRAPOLATE_FACTOR = 10.0  # extrapolate the frontier to 10x the largest training compute measured


def _sampler_name(row) -> str:
    """"dpm-solver++ (diffusers.DPMSolverMultistepScheduler 0.42.1)": the sampler and the code behind it."""
    impl, version = row.get("sampler_impl"), row.get("sampler_version")
    return f"{row['sampler']} ({impl} {version})" if isinstance(impl, str) and impl else str(row["sampler"])


def _g(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return "0" if abs(x) < 1e-9 else f"{x:.{digits}g}"


def paper_setup_matches(frame: pd.DataFrame) -> bool:
    """The paper's numbers are a valid reference only for its protocol: official Inception features,
    256px ImageNet (1000 classes, not the digits study), FID-50K without guidance."""
    return bool(len(frame)) and bool(
        (frame["feature_space"] == "inception").all() and (frame["image_size"] == 256).all()
        and (frame["num_classes"] == 1000).all() and (frame["dataset"] != "digits").all()
        and (frame["num_samples"] == 50000).all() and (frame["cfg_scale"].astype(float) == 1.0).all())


def _paper_400k(conditioning: str = "adaLN-Zero") -> list[dict]:
    return [r for r in table4() if r["image_size"] == 256 and r["train_steps"] == 400000
            and r["conditioning"] == conditioning]


def _run_table(res: SweepResults) -> Table:
    f = default_setting(res.frame)
    rows = []
    for run in sorted(res.runs, key=lambda r: (float(r.get("gflops") or 0), r.get("run_id", ""))):
        rid = run.get("run_id", "")
        g = f[f["run_id"] == rid].sort_values("step")
        last = g.iloc[-1] if len(g) else None
        params = run.get("params")
        rows.append([rid, run.get("model", ""), run.get("conditioning", ""), str(run.get("seed", "")),
                     _g(run.get("gflops")), _g(params / 1e6 if params else None, 3),
                     f"{int(last['step']):,}" if last is not None else "–",
                     _g(last["fid"]) if last is not None else "–",
                     _g(last["train_wall_s"], 3) if last is not None else "–",
                     res.missing.get(rid, "evaluated")])
    for rid, why in res.missing.items():
        if not any(r[0] == rid for r in rows):
            rows.append([rid, "", "", "", "", "", "–", "–", "–", why])
    return Table("Runs", ["run id", "model", "conditioning", "seed", "Gflops", "params (M)", "last step",
                          "FID", "train wall (s)", "status"], rows,
                 "FID at each run's last evaluated step, in the default sampling setting "
                 "(most common setting without guidance).")


def _provenance(frame: pd.DataFrame) -> Table:
    keys = ["feature_space", "reference", "num_samples"]
    rows = []
    for m, label in METRICS.items():
        sub = frame[frame[m].notna()]
        if sub.empty:
            continue
        for combo, g in sub.groupby(keys, dropna=False):
            rows.append([label, *[("–" if pd.isna(v) else str(v)) for v in combo], str(len(g))])
    return Table("Metrics", ["metric", "feature space", "reference", "samples", "records"], rows,
                 "FID and friends are comparable only within one feature space and reference set: "
                 "'digits' features are the embedded small classifier, 'inception' the standard FID network.")


def build_sweep_report(res: SweepResults, n_boot: int = 500) -> Report:
    """Analyse a loaded sweep and lay out its report (figures not yet written)."""
    frame = res.frame
    cond = F.main_conditioning(frame)
    main = frame[frame["conditioning"] == cond]
    matches = paper_setup_matches(frame)
    paper_rows = _paper_400k() if matches else None
    rep = Report(title=f"DiT scaling report: sweep '{res.name}'", name=res.name,
                 missing=list(res.missing.items()),
                 expected_runs=len(res.expected) if res.expected else len(res.runs) + sum(
                     1 for r in res.missing if r not in {x.get("run_id") for x in res.runs}),
                 spec_text=res.spec_text, csv_name="results.csv", csv_text=frame.to_csv(index=False))
    fs = sorted(frame["feature_space"].dropna().unique())
    rep.notes.append(f"{frame['run_id'].nunique()} evaluated runs, {len(frame)} evaluation records; "
                     f"metrics in feature space(s): {', '.join(fs) or 'unknown'}.")
    if not matches:
        rep.notes.append("The paper's published numbers are not overlaid: its setup (Inception features, "
                         "256px ImageNet) differs from this sweep's.")
    fits: list[list[str]] = []

    # FID vs training steps
    if main["fid"].notna().any():
        rep.figures.append(FigureSpec("fid_vs_steps", "FID vs training steps",
                                      f"One line per model ({cond}); colour = size, line style = patch. Shaded: "
                                      "range over seeds.", F.fid_vs_steps(frame, paper_rows=paper_rows)))
    # correlation and fit against Gflops at one step
    models, step = analysis.per_model(main)
    corrs = analysis.correlations(main, step)
    fid_corr = next((c for c in corrs if c.metric == "fid"), None)
    gfit = None
    ok = models["fid"].notna()
    if ok.sum() >= 3 and models.loc[ok, "gflops"].nunique() >= 2:
        gfit = analysis.fit_power_law(models.loc[ok, "gflops"], models.loc[ok, "fid"], n_boot=n_boot)
        fits.append([f"FID vs Gflops (step {step:,})", gfit.form, f"a = {_g(gfit.a)}",
                     f"b = {gfit.b:.4f} {analysis.ci_text(gfit.b_ci, '.4f')}", str(gfit.n), _g(gfit.r2, 3)])
    if fid_corr is not None and np.isfinite(fid_corr.pearson_r):
        rep.notes.append(f"At step {step:,}, Pearson r between log10(Gflops) and FID over {fid_corr.n} models is "
                         f"{fid_corr.pearson_r:.3f} (p = {fid_corr.pearson_p:.2g}); Spearman ρ = "
                         f"{fid_corr.spearman_rho:.3f}. The paper reports -0.93 for its 12 models at 400K steps.")
    pairs = analysis.patch_pairs(models)
    if pairs:
        wins = sum(p["smaller_wins"] for p in pairs)
        detail = "; ".join(f"{p['size']}: /{p['small_patch']} {p['small']:.3g} vs /{p['large_patch']} {p['large']:.3g}"
                           for p in pairs)
        rep.notes.append(f"Patch size at fixed model size (step {step:,}): the smaller patch has the lower FID in "
                         f"{wins} of {len(pairs)} pairs ({detail}). The paper finds smaller patches better at "
                         "every size.")
    all_blocks, _ = analysis.per_model(frame, step)
    for model, ranked in analysis.conditioning_ranking(all_blocks).items():
        order = " < ".join(f"{c} {v:.3g}" for c, v in ranked)
        rep.notes.append(f"Conditioning ablation on {model} (FID, step {step:,}): {order}; best: {ranked[0][0]}. "
                         "The paper's order on DiT-XL/2: adaLN-Zero < adaLN < cross-attention < in-context.")
    if models["fid"].notna().any():
        rep.figures.append(FigureSpec("fid_vs_gflops", "FID vs transformer Gflops",
                                      "One point per model at one step (seed mean); log x; black: power-law fit "
                                      "with its 95% bootstrap band.",
                                      F.fid_vs_gflops(models, fid_corr, gfit, step, paper_rows=paper_rows)))
    # training compute: frontier, fit, extrapolation
    front = ffit = extrap = None
    try:
        front = analysis.frontier(main, "fid", "train_compute")
        ffit = analysis.fit_frontier(main, "fid", "train_compute", n_boot=n_boot)
        target = EXTRAPOLATE_FACTOR * float(main["train_compute"].max())
        extrap = analysis.extrapolate(ffit, target)
        fits.append(["FID vs training compute (frontier)", ffit.form, f"a = {_g(ffit.a)}",
                     f"b = {ffit.b:.4f} {analysis.ci_text(ffit.b_ci, '.4f')}", str(ffit.n), _g(ffit.r2, 3)])
        rep.notes.append(f"Frontier power law: FID ≈ {ffit.a:.3g}·C^{ffit.b:.3f} (95% CI of the exponent "
                         f"{analysis.ci_text(ffit.b_ci)}); extrapolated to C = {target:.3g} Gflops: "
                         f"FID {extrap.value:.3g} {analysis.ci_text((extrap.lo, extrap.hi), '.3g')}.")
        fx, fy, fk = analysis.frontier_points(analysis.curves(main, "fid", "train_compute", by="run_id"))
        try:
            sat = analysis.fit_saturating(fx, fy, fk, n_boot=min(n_boot, 200))
            sx = analysis.extrapolate(sat, target)
            fits.append(["FID vs training compute (frontier)", sat.form,
                         f"F_inf = {_g(sat.f_inf)} {analysis.ci_text(sat.f_inf_ci, '.4g')}, A = {_g(sat.A)}",
                         f"alpha = {sat.alpha:.4f} {analysis.ci_text(sat.alpha_ci, '.4f')}", str(sat.n), "–"])
            rep.notes.append(f"Saturating fit on the frontier: F_inf = {sat.f_inf:.3g}, alpha = {sat.alpha:.3f}; "
                             f"at C = {target:.3g}: FID {sx.value:.3g} {analysis.ci_text((sx.lo, sx.hi), '.3g')}.")
        except HarnessError as err:
            log.info("saturating fit skipped: %s", err)
    except HarnessError as err:
        log.info("frontier fit skipped: %s", err)
    if front is not None:
        paper_pts = ([(r["model"], train_compute(r["gflops"], PAPER_GLOBAL_BATCH, r["train_steps"]), r["fid50k"]) for r in paper_rows]
                     if paper_rows else None)
        rep.figures.append(FigureSpec("fid_vs_train_compute", "FID vs training compute",
                                      "Log-log; grey band: the compute-efficient frontier (best model at each "
                                      "compute); dotted verticals: crossovers; diamond: extrapolation with its "
                                      "95% bootstrap interval (runs resampled).",
                                      F.fid_vs_train_compute(main, front, ffit, extrap, paper_points=paper_pts)))
        rep.tables.append(Table("Compute-efficient frontier: crossovers", ["training compute (Gflops)", "best below",
                                                                           "best above"],
                                [[_g(c.compute), c.before, c.after] for c in front.crossovers] or
                                [["–", front.best[0] or "–", "(no crossover in the measured range)"]]))
    # conditioning ablation
    if frame.groupby("model")["conditioning"].nunique().max() > 1:
        rows = _paper_400k_all() if matches else None
        rep.figures.append(FigureSpec("conditioning", "Conditioning block ablation",
                                      "FID vs steps per conditioning block, and at the last step.",
                                      F.conditioning_ablation(frame, paper_rows=rows)))
    # sampling compute
    study = analysis.sampling_study(frame)
    if study.groupby("run_id")["sampling_steps"].nunique().max() > 1 or study["cfg_scale"].nunique() > 1:
        rep.figures.append(FigureSpec("sampling_compute", "FID vs sampling compute",
                                      "Last checkpoint of each run; numbers: sampling steps. Sampling compute = "
                                      "model Gflops × steps, ×2 with classifier-free guidance.",
                                      F.sampling_compute(study)))
        rep.tables.append(Table("Sampling compute", ["model", "steps", "sampler", "cfg", "sampling Gflops", "FID"],
                                [[r["label"], str(int(r["sampling_steps"])), _sampler_name(r), _g(r["cfg_scale"]),
                                  _g(r["sampling_compute"]), _g(r["fid"])] for _, r in study.iterrows()]))
    # sample grids
    grids = []
    for run in sorted(res.runs, key=lambda r: (float(r.get("gflops") or 0), r.get("run_id", ""))):
        found = sorted((res.root / "runs" / run.get("run_id", "") / "samples").glob("grid_step_*.png"))
        if found:
            step_n = int(found[-1].stem.rsplit("_", 1)[-1])
            grids.append((f"{run.get('model')} {run.get('conditioning')} s{run.get('seed')} @ {step_n:,}", found[-1]))
    if grids:
        rep.figures.append(FigureSpec("samples", "Sample grids", "The newest sample grid of each run.",
                                      F.sample_grids(grids)))
    # tables
    rep.tables.insert(0, _run_table(res))
    rep.tables.insert(1, Table(f"Correlation with model Gflops at step {step:,} ({cond})",
                               ["metric", "n", "Pearson r (log10 Gflops)", "p", "Spearman ρ", "p"],
                               [[METRICS[c.metric], str(c.n), _g(c.pearson_r, 3), _g(c.pearson_p, 2),
                                 _g(c.spearman_rho, 3), _g(c.spearman_p, 2)] for c in corrs]))
    few = " With fewer than 5 runs these intervals are rough." if frame["run_id"].nunique() < 5 else ""
    rep.tables.insert(2, Table("Fits", ["data", "form", "scale", "exponent [95% CI]", "points", "R² (log)"], fits,
                               "Confidence intervals: percentile bootstrap over runs (all points of a run resampled "
                               "together). Compute in Gflops; training compute = model Gflops × batch × steps × 3."
                               + few))
    rep.provenance = _provenance(frame)
    return rep


def _paper_400k_all() -> list[dict]:
    return [r for r in table4() if r["model"] == "DiT-XL/2" and r["image_size"] == 256 and r["train_steps"] == 400000]


def render_sweep_report(results_root: str | Path, sweep: str | Path, out_root: str | Path, n_boot: int = 500) -> dict:
    """Load, analyse and write reports/<name>/; returns the manifest (figures, PDF pages, missing runs)."""
    res = load_sweep(results_root, sweep)
    return write_report(build_sweep_report(res, n_boot=n_boot), out_root)
