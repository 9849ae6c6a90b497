"""The report of one sweep: analyses of its tidy table, turned into figures, tables and notes."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from harness.study import analysis, laws
from harness.errors import HarnessError
from harness.paper import PAPER_CORRELATION_LOG_GFLOPS_FID, PAPER_GLOBAL_BATCH, table4, train_compute
from harness.report import figures as F
from harness.report.forecast_section import add_forecast_section
from harness.report import timeline, training
from harness.report.render import FigureSpec, Report, Table, write_report
from harness.report.view import SweepView, sweep_view
from harness.study.results import METRICS, SweepResults, load_sweep

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


def _pm(value: float, se: float) -> str:
    """'12.3 ± 0.4' (± 1.645 standard errors, a 90% interval), or the value alone without an error."""
    return f"{value:.3g} ± {1.645 * se:.2g}" if np.isfinite(se) else f"{value:.3g}"


def _fit_row(data: str, fit, scale: str, exponent: str, r2: str) -> list[str]:
    return [data, fit.form, scale, exponent, str(fit.n), r2]


# --------------------------------------------------------------------------- sections, in report order
# Each section reads the view and adds its figures, notes, tables and fit rows to the report.
def _overview(v: SweepView, rep: Report, fits: list, n_boot: int) -> None:
    fs = sorted(v.frame["feature_space"].dropna().unique())
    rep.notes.append(f"{v.frame['run_id'].nunique()} evaluated runs, {len(v.frame)} evaluation records; "
                     f"metrics in feature space(s): {', '.join(fs) or 'unknown'}.")
    if v.paper_rows is None:
        rep.notes.append("The paper's published numbers are not overlaid: its setup (Inception features, "
                         "256px ImageNet) differs from this sweep's.")


def _steps_and_gflops(v: SweepView, rep: Report, fits: list, n_boot: int) -> None:
    """FID vs training steps; FID vs Gflops at one step, its correlation and power law; patch pairs."""
    if v.main["fid"].notna().any():
        rep.figures.append(FigureSpec("fid_vs_steps", "FID vs training steps",
                                      f"One line per model ({v.cond}, seed mean); colour = size, line style = patch. "
                                      + F.uncertainty_caption(v.main),
                                      F.fid_vs_steps(v.default, paper_rows=v.paper_rows)))
    gfit = None
    ok = v.models["fid"].notna()
    if ok.sum() >= 3 and v.models.loc[ok, "gflops"].nunique() >= 2:
        gfit = laws.power_law(v.models.loc[ok, "gflops"], v.models.loc[ok, "fid"], n_boot=n_boot)
        fits.append(_fit_row(f"FID vs Gflops (step {v.step:,})", gfit, f"a = {_g(gfit.a)}",
                             f"b = {gfit.b:.4f} {analysis.ci_text(gfit.b_ci, '.4f')}", _g(gfit.r2, 3)))
        v.findings.append([f"Larger models reach lower FID: exponent b of FID ∝ Gflops^b at step {v.step:,}",
                           f"b = {gfit.b:.3f}", analysis.ci_text(gfit.b_ci) + " (95%)",
                           "yes: b < 0" if gfit.b_ci[1] < 0 else "no: the interval reaches 0", "fid_vs_gflops"])
    c = v.fid_corr
    if c is not None and np.isfinite(c.pearson_r):
        v.findings.insert(0, [f"FID falls as model Gflops grow: correlation over {c.n} models at step {v.step:,}",
                              f"r = {c.pearson_r:.2f} (Spearman ρ = {c.spearman_rho:.2f})", f"p = {c.pearson_p:.2g}",
                              "yes: p < 0.05" if c.pearson_p < 0.05 else "no: p ≥ 0.05", "fid_vs_gflops"])
        rep.notes.append(f"At step {v.step:,}, Pearson r between log10(Gflops) and FID over {c.n} models is "
                         f"{c.pearson_r:.3f} (p = {c.pearson_p:.2g}); Spearman ρ = {c.spearman_rho:.3f}. The paper "
                         f"reports {PAPER_CORRELATION_LOG_GFLOPS_FID} for its 12 models at 400K steps.")
    pairs = analysis.patch_pairs(v.models, paired_se=v.paired_se)
    if pairs:
        wins = sum(p["smaller_wins"] for p in pairs)
        resolved = sum(p["status"] == "resolved" for p in pairs)
        detail = "; ".join(f"{p['size']}: /{p['small_patch']} {_pm(p['small'], p['small_se'])} vs /{p['large_patch']} "
                           f"{_pm(p['large'], p['large_se'])} ({p['status']}{', paired' if p['paired'] else ''})"
                           for p in pairs)
        rep.notes.append(f"Patch size at fixed model size (step {v.step:,}): the smaller patch has the lower FID in "
                         f"{wins} of {len(pairs)} pairs, {resolved} of them resolved ({detail}). The paper finds "
                         "smaller patches better at every size.")
        for p in pairs:
            better = "smaller" if p["smaller_wins"] else "larger"
            v.findings.append([f"Size {p['size']}: the {better} patch gives the lower FID (/{p['small_patch']} vs "
                               f"/{p['large_patch']})", f"{p['small']:.3g} vs {p['large']:.3g}",
                               _pm_pair(p["small_se"], p["large_se"]), _resolved(p["status"], p["paired"]),
                               "fid_vs_gflops"])
    all_blocks, _ = analysis.per_model(v.default, v.step)
    verdicts = analysis.conditioning_verdicts(all_blocks, paired_se=v.paired_se)
    for model, ranked in analysis.conditioning_ranking(all_blocks).items():
        order = " < ".join(f"{c} {_pm(val, se)}" for c, val, se in ranked)
        steps_ = verdicts[model]
        rep.notes.append(f"Conditioning ablation on {model} (FID, step {v.step:,}): {order}; neighbours: "
                         f"{', '.join(st.status + (' (paired)' if st.paired else '') for st in steps_)}. The "
                         "paper's order on DiT-XL/2: adaLN-Zero < adaLN < cross-attention < in-context.")
        for a, b, st in zip(ranked, ranked[1:], steps_):
            v.findings.append([f"{model}: {a[0]} gives a lower FID than {b[0]}", f"{a[1]:.3g} vs {b[1]:.3g}",
                               _pm_pair(a[2], b[2]), _resolved(st.status, st.paired), "conditioning"])
    if v.paired_se.note():
        rep.notes.append(v.paired_se.note())
    if v.models["fid"].notna().any():
        rep.headline = "fid_vs_gflops"
        bars = " Bars: 90% interval of each FID (± 1.645 standard errors)." if v.models["fid_se"].notna().any() else ""
        rep.figures.insert(0, FigureSpec(
            "fid_vs_gflops", "FID vs transformer Gflops",
            f"One point per model at step {v.step:,} ({v.cond}, seed mean); log x.{bars}"
            + (" Black line: power law fitted to the points; grey band: its 95% bootstrap band (runs resampled)."
               if gfit is not None else " No fit: it needs at least 3 models at this step.")
            + (" The box gives the correlation of FID with log10(Gflops)." if c is not None and np.isfinite(c.pearson_r)
               else ""), F.fid_vs_gflops(v.models, c, gfit, v.step, paper_rows=v.paper_rows)))


def _resolved(status: str, paired: bool = False) -> str:
    """analysis.compare's verdict in the findings table's words; 'paired SE' where the paired error judged it."""
    se = "paired SE" if paired else "SE"
    return {"resolved": f"yes: apart by more than 1.645 {se}", "not resolved at this budget": f"no: within 1.645 {se}",
            "no uncertainty recorded": "unknown: no standard error recorded"}.get(status, status)


def _pm_pair(se_a: float, se_b: float) -> str:
    """'± 1.2 / ± 0.8' (90% half-widths), or '–' when a standard error is missing."""
    if not (np.isfinite(se_a) and np.isfinite(se_b)):
        return "–"
    return f"± {1.645 * se_a:.2g} / ± {1.645 * se_b:.2g}"


def _saturating(v: SweepView, rep: Report, fits: list, n_boot: int) -> None:
    """E + A * C^-alpha on the frontier, in log FID with E >= 0: each parameter with its interval, or
    "not identified" (a bound hit, an interval spanning orders of magnitude), never a bare number."""
    fx, fy, fk = analysis.frontier_points(analysis.curves(v.main, "fid", "train_compute", by="run_id"))
    try:
        sat = laws.fit(laws.Choice("saturating", "log", "squares", "nonneg"), {"compute": fx}, fy, fk,
                       n_boot=min(n_boot, 200))
    except HarnessError as err:
        log.info("saturating fit skipped: %s", err)
        return
    ident, cis, vals = sat.identification(fy), sat.param_intervals(), sat.params()
    text = {k: (f"{vals[k]:.3g} [{cis[k][0]:.3g}, {cis[k][1]:.3g}]" if ident[k] is None
                else f"not identified: {ident[k]}") for k in vals}
    fits.append(["FID vs training compute (frontier)", sat.law.formula + f", C0 = {sat.x0[0]:.3g}",
                 f"E = {text['E']}; A = {text['A']}", f"alpha = {text['alpha']}", str(sat.n), "–"])
    rep.notes.append(f"Saturating fit on the frontier (log FID): E = {text['E']}; alpha = {text['alpha']}.")


def _training_compute(v: SweepView, rep: Report, fits: list, n_boot: int) -> None:
    """The compute-efficient frontier, its power-law (and saturating) fit and the extrapolation."""
    try:
        front = analysis.frontier(v.main, "fid", "train_compute")
    except HarnessError as err:
        log.info("no compute frontier: %s", err)
        return
    ffit = extrap = None
    try:  # the frontier is drawn even when too few points allow a fit
        ffit = analysis.fit_frontier(v.main, "fid", "train_compute", n_boot=n_boot)
        target = EXTRAPOLATE_FACTOR * float(v.main["train_compute"].max())
        extrap = analysis.extrapolate(ffit, target)
        fits.append(_fit_row("FID vs training compute (frontier)", ffit, f"a = {_g(ffit.a)}",
                             f"b = {ffit.b:.4f} {analysis.ci_text(ffit.b_ci, '.4f')}", _g(ffit.r2, 3)))
        rep.notes.append(f"Frontier power law: FID ≈ {ffit.a:.3g}·C^{ffit.b:.3f} (95% CI of the exponent "
                         f"{analysis.ci_text(ffit.b_ci)}); extrapolated to C = {target:.3g} Gflops: "
                         f"FID {extrap.value:.3g} {analysis.ci_text((extrap.lo, extrap.hi), '.3g')}.")
        _saturating(v, rep, fits, n_boot)
    except HarnessError as err:
        log.info("frontier fit skipped: %s", err)
    paper_pts = ([(r["model"], train_compute(r["gflops"], PAPER_GLOBAL_BATCH, r["train_steps"]), r["fid50k"])
                  for r in v.paper_rows] if v.paper_rows else None)
    bars = F.uncertainty_caption(v.main)
    rep.figures.append(FigureSpec("fid_vs_train_compute", "FID vs training compute",
                                  "Log-log; one line per model (seed mean). " + bars + " Thick grey: the "
                                  "compute-efficient frontier, the lowest FID any model reached with at most that "
                                  "compute; thin black: a power law fitted to the frontier; diamond: its "
                                  f"extrapolation to {EXTRAPOLATE_FACTOR:g}× the largest compute, with its 95% "
                                  "bootstrap interval (runs resampled). Where the best model changes: the table "
                                  "'Compute-efficient frontier: crossovers' under Details.",
                                  F.fid_vs_train_compute(v.main, front, ffit, extrap, paper_points=paper_pts)))
    rep.tables.append(Table("Compute-efficient frontier: crossovers", ["training compute (Gflops)", "best below",
                                                                       "best above"],
                            [[_g(c.compute), c.before, c.after] for c in front.crossovers] or
                            [["–", front.best[0] or "–", "(no crossover in the measured range)"]]))


def _forecast(v: SweepView, rep: Report, fits: list, n_boot: int) -> None:
    """Back-test of the scaling laws, residuals, the compute-optimal view, the next model's forecast."""
    figures, tables, first = len(rep.figures), len(rep.tables), len(v.findings)
    add_forecast_section(rep, v.default, v.findings, n_boot=min(n_boot, 200))
    for f in rep.figures[figures:]:
        f.section = "forecast"
    for t in rep.tables[tables:]:  # candidate laws and the isoFLOP numbers: diagnostics, under Details
        t.section = "details"
    v.findings[first:] = [row for row in map(_forecast_finding, v.findings[first:]) if row is not None]


def _forecast_finding(row: list[str]) -> list[str] | None:
    """A forecast-section finding in the table's words; the next-model forecast is a prediction, not a
    finding, and stays in the forecast section (its notes)."""
    name, value, interval, status = row[:4]
    if name.startswith("forecast:"):
        return None
    if name.startswith("back-test: FID of "):
        model = name.removeprefix("back-test: FID of ").removesuffix(" (held out)")
        return [f"Scaling law fitted to the smaller models predicts held-out {model} (predicted vs measured FID)",
                value, interval + " (90%)", "yes: measured value inside the interval" if status == "covered"
                else "no: measured value outside the interval", "forecast_backtest"]
    if name.startswith("compute-optimal"):
        verdict = {"resolved": "yes: slope > 0", "not identified": "no: not identified"}.get(
            status, "no: the interval reaches 0")
        return ["Larger budgets favour larger models: slope of the best model's log Gflops against log compute",
                value, interval + (" (90%)" if interval != "–" else ""), verdict, "compute_optimal"]
    return list(row[:4]) + [row[4] if len(row) > 4 else ""]


def _conditioning(v: SweepView, rep: Report, fits: list, n_boot: int) -> None:
    if v.default.groupby("model")["conditioning"].nunique().max() > 1:
        rows = _paper_400k_all() if v.paper_rows is not None else None
        rep.figures.append(FigureSpec("conditioning", "Conditioning block ablation",
                                      "Left: FID against steps per conditioning block; right: FID at the last "
                                      "step. " + F.uncertainty_caption(v.default[v.default["model"] == F.ablation_model(
                                          v.default)]), F.conditioning_ablation(v.default, paper_rows=rows),
                                      section="ablations"))


def _sampling_compute(v: SweepView, rep: Report, fits: list, n_boot: int) -> None:
    """Every evaluation setting (not only the default): FID against sampling steps and guidance."""
    study = analysis.sampling_study(v.frame)
    if study.groupby("run_id")["sampling_steps"].nunique().max() > 1 or study["cfg_scale"].nunique() > 1:
        rep.figures.append(FigureSpec("sampling_compute", "FID vs sampling compute",
                                      "Last checkpoint of each run; numbers: sampling steps. Sampling compute = "
                                      "model Gflops × steps, ×2 with classifier-free guidance.",
                                      F.sampling_compute(study), section="ablations"))
        rep.tables.append(Table("Sampling compute", ["model", "steps", "sampler", "cfg", "sampling Gflops", "FID"],
                                [[r["label"], str(int(r["sampling_steps"])), _sampler_name(r), _g(r["cfg_scale"]),
                                  _g(r["sampling_compute"]), _g(r["fid"])] for _, r in study.iterrows()]))


def _training(v: SweepView, rep: Report, fits: list, n_boot: int) -> None:
    """Loss curves and every metric against steps and compute (harness.report.training)."""
    training.loss_section(v, rep)
    training.metric_curves_section(v, rep)


def _samples_and_cost(v: SweepView, rep: Report, fits: list, n_boot: int) -> None:
    training.samples_section(v, rep)
    training.cost_section(v, rep)
    timeline.timeline_section(v.res, rep)


def _throughput(v: SweepView, rep: Report, fits: list, n_boot: int) -> None:
    """Training speed per run from train.jsonl (medians after the first log line)."""
    rows = []
    for run in training.runs_by_gflops(v.res.runs):
        t = v.res.throughput.get(run.get("run_id", ""))
        if t is None:
            continue
        mfu = "–" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
        compiled = {True: "compiled", False: "eager"}.get(t["compiled"], "–")
        rows.append([run.get("run_id", ""), run.get("model", ""), _g(t["images_per_s"], 4), _g(t["steps_per_s"], 3),
                     _g(t["tflops_per_device"], 3), mfu, str(t["micro_batch"] or "–"), compiled,
                     _g(t["peak_mem_mb"] / 1024 if t["peak_mem_mb"] else None, 3)])
    if rows:
        rep.tables.append(Table("Training throughput", ["run id", "model", "images/s", "steps/s",
                                                        "TFLOP/s per device", "MFU", "micro-batch", "step",
                                                        "peak memory (GB)"], rows,
                                "Medians over each run's train.jsonl log lines after the first (start-up and "
                                "compilation). TFLOP/s = Gflops × 2 × 3 × images/s per device; MFU against the "
                                "device's dense peak where it is known (– on CPUs)."))


#: the report's sections in order; a new analysis adds a function here
SECTIONS = (_overview, _steps_and_gflops, _training_compute, _training, _forecast, _conditioning, _sampling_compute,
            _samples_and_cost, _throughput)


# --------------------------------------------------------------------------- tables that lead the report
def _run_table(v: SweepView) -> Table:
    rows = []
    for run in training.runs_by_gflops(v.res.runs):
        rid = run.get("run_id", "")
        g = v.default[v.default["run_id"] == rid].sort_values("step")
        last = g.iloc[-1] if len(g) else None
        params = run.get("params")
        rows.append([rid, run.get("model", ""), run.get("conditioning", ""), str(run.get("seed", "")),
                     _g(run.get("gflops")), _g(params / 1e6 if params else None, 3),
                     f"{int(last['step']):,}" if last is not None else "–",
                     _g(last["fid"]) if last is not None else "–",
                     _g(last["train_wall_s"], 3) if last is not None else "–",
                     v.res.missing.get(rid, "evaluated")])
    listed = {r[0] for r in rows}
    rows += [[rid, "", "", "", "", "", "–", "–", "–", why] for rid, why in v.res.missing.items() if rid not in listed]
    return Table("Runs", ["run id", "model", "conditioning", "seed", "Gflops", "params (M)", "last step",
                          "FID", "train wall (s)", "status"], rows,
                 "FID at each run's last evaluated step, in the default sampling setting "
                 "(most common setting without guidance).")


def _correlation_table(v: SweepView) -> Table:
    return Table(f"Correlation with model Gflops at step {v.step:,} ({v.cond})",
                 ["metric", "n", "Pearson r (log10 Gflops)", "p", "Spearman ρ", "p"],
                 [[METRICS[c.metric], str(c.n), _g(c.pearson_r, 3), _g(c.pearson_p, 2),
                   _g(c.spearman_rho, 3), _g(c.spearman_p, 2)] for c in v.corrs])


def _fits_table(v: SweepView, fits: list[list[str]]) -> Table:
    few = " With fewer than 5 runs these intervals are rough." if v.frame["run_id"].nunique() < 5 else ""
    return Table("Fits", ["data", "form", "scale", "exponent [95% CI]", "points", "R² (log)"], fits,
                 "Confidence intervals: percentile bootstrap over runs (all points of a run resampled "
                 "together). Compute in Gflops; training compute = model Gflops × batch × steps × 3." + few)


def _provenance(frame: pd.DataFrame) -> Table:
    keys = ["feature_space", "reference", "num_samples"]
    rows = []
    for m, label in METRICS.items():
        sub = frame[frame[m].notna()]
        if sub.empty:
            continue
        for combo, g in sub.groupby(keys, dropna=False):
            rows.append([label, *[("–" if pd.isna(val) else str(val)) for val in combo], str(len(g))])
    return Table("Metrics", ["metric", "feature space", "reference", "samples", "records"], rows,
                 "FID and friends are comparable only within one feature space and reference set: "
                 "'digits' features are the embedded small classifier, 'inception' the standard FID network.")


def build_sweep_report(res: SweepResults, n_boot: int = 500) -> Report:
    """Analyse a loaded sweep and lay out its report (figures not yet written): the frame is
    filtered once (`sweep_view`), then each of SECTIONS adds its part."""
    v = sweep_view(res)
    found = {x.get("run_id") for x in res.runs}
    rep = Report(title=f"DiT scaling report: sweep '{res.name}'", name=res.name, missing=list(res.missing.items()),
                 expected_runs=len(res.expected) if res.expected else len(res.runs) + sum(
                     1 for r in res.missing if r not in found),
                 spec_text=res.spec_text, csv_name="results.csv", csv_text=v.frame.to_csv(index=False))
    fits: list[list[str]] = []
    for section in SECTIONS:
        section(v, rep, fits, n_boot)
    rep.tables[:0] = [_run_table(v), _correlation_table(v), _fits_table(v, fits)]
    rep.findings = Table("Findings and their uncertainty", ["finding", "value", "interval", "resolved?", "figure"],
                         v.findings,
                         "Intervals: 95% bootstrap over runs for fitted exponents, 90% for forecasts and the "
                         "compute-optimal slope; comparisons: ± 1.645 standard errors (bootstrap over samples, or "
                         "over seeds), resolved when the two values are further apart than 1.645 standard errors "
                         "of their difference: the two errors combined, or, marked 'paired SE', the difference's own "
                         "error where the two evaluations' samples share noise and labels (a bootstrap resampling the "
                         "same samples of both). How each law was fitted: Details.")
    rep.provenance = _provenance(v.frame)
    return rep


def _paper_400k_all() -> list[dict]:
    return [r for r in table4() if r["model"] == "DiT-XL/2" and r["image_size"] == 256 and r["train_steps"] == 400000]


def render_sweep_report(results_root: str | Path, sweep: str | Path, out_root: str | Path, n_boot: int = 500) -> dict:
    """Load, analyse and write reports/<name>/; returns the manifest (figures, PDF pages, missing runs)."""
    res = load_sweep(results_root, sweep)
    return write_report(build_sweep_report(res, n_boot=n_boot), out_root)
