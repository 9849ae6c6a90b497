"""Analysis on synthetic records from known laws: fits recover the truth, statistics equal scipy's."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.study import analysis
from harness.errors import HarnessError
from harness.study.results import COLUMNS, load_sweep, sweep_name
from report_synth import BATCH, MODELS, load_results, true_fid, write_sweep


def _records(gflops, fid, run_ids, steps=None) -> pd.DataFrame:
    n = len(fid)
    df = pd.DataFrame({c: [None] * n for c in COLUMNS})
    df["run_id"], df["model"] = run_ids, run_ids
    df["gflops"], df["fid"] = np.asarray(gflops, float), np.asarray(fid, float)
    df["step"] = steps if steps is not None else [1000] * n
    df["train_compute"] = df["gflops"] * BATCH * df["step"] * 3
    df["conditioning"], df["size"], df["patch"], df["seed"] = "adaLN-Zero", "S", 2, 0
    df["sampling_steps"], df["sampler"], df["cfg_scale"], df["feature_space"] = 50, "ddim", 1.0, "digits"
    for m in ("sfid", "inception_score", "precision", "recall"):
        df[m] = np.nan
    return df


def best_at(front: analysis.Frontier, compute: float) -> str | None:
    """The curve with the lowest value at `compute` (interpolated), or None where no curve reaches it."""
    vals = {k: analysis.interp(cx, cy, compute) for k, (cx, cy) in front.curves.items()}
    vals = {k: v for k, v in vals.items() if np.isfinite(v)}
    return min(vals, key=vals.get) if vals else None


def test_correlations_equal_scipy():
    rng = np.random.default_rng(4)
    g = np.geomspace(0.3, 120, 9)
    fid = 150 * g ** -0.35 + rng.normal(0, 3, 9)
    df = _records(g, fid, [f"m{i}" for i in range(9)])
    (c,) = analysis.correlations(df, metrics=("fid",))
    ref_p = stats.pearsonr(np.log10(g), fid)
    ref_s = stats.spearmanr(g, fid)
    assert c.n == 9 and c.step == 1000
    assert c.pearson_r == pytest.approx(ref_p.statistic, abs=1e-12)
    assert c.pearson_p == pytest.approx(ref_p.pvalue, rel=1e-9)
    assert c.spearman_rho == pytest.approx(ref_s.statistic, abs=1e-12)
    assert c.spearman_p == pytest.approx(ref_s.pvalue, rel=1e-9)


def test_paper_table4_correlation_is_minus_0_93():
    from harness.paper import PAPER_CORRELATION_LOG_GFLOPS_FID, table4
    rows = [r for r in table4() if r["conditioning"] == "adaLN-Zero" and r["image_size"] == 256
            and r["train_steps"] == 400000]
    c = analysis.correlation([r["gflops"] for r in rows], [r["fid50k"] for r in rows])
    assert c.n == 12
    assert round(c.pearson_r, 2) == PAPER_CORRELATION_LOG_GFLOPS_FID


def test_frontier_picks_the_right_model_and_crossover():
    # A: 100 C^-0.2 over C in [10, 1e4]; B: 400 C^-0.4 over [40, 4e4]. A wins below C = 4^5 = 1024.
    rows = []
    for name, a, b, c_lo, c_hi in [("A", 100, -0.2, 10, 1e4), ("B", 400, -0.4, 40, 4e4)]:
        for c in np.geomspace(c_lo, c_hi, 9):
            rows.append((name, c, a * c ** b))
    df = _records([1.0] * len(rows), [r[2] for r in rows], [r[0] for r in rows])
    df["train_compute"] = [r[1] for r in rows]
    df["step"] = np.arange(len(rows))
    front = analysis.frontier(df, "fid", "train_compute")
    assert best_at(front, 20) == "A"                        # only A exists below 40
    assert best_at(front, 100) == "A" and best_at(front, 900) == "A"
    assert best_at(front, 1200) == "B" and best_at(front, 2e4) == "B"
    assert len(front.crossovers) == 1
    co = front.crossovers[0]
    assert (co.before, co.after) == ("A", "B")
    assert co.compute == pytest.approx(1024, rel=1e-3)     # log-log interpolation is exact for power laws
    grid_best = dict(zip(np.round(front.grid, 6), front.best))
    assert all(v == ("A" if c < 1000 else "B") for c, v in grid_best.items() if abs(np.log10(c / 1024)) > 0.02)


def test_frontier_from_records_and_extrapolation(tmp_path):
    write_sweep(tmp_path, "fr", conditioning_ablation=False, sampling=False)
    df = load_results(tmp_path, "fr")
    front = analysis.frontier(df)
    # the truth at each model's own evaluated computes: the smallest true FID among models there
    for c in front.grid[::16]:
        truth = {}
        for m, (_, _, _, _, _, g) in MODELS.items():
            step = c / (g * BATCH * 3)
            if 250 * (1 - 1e-9) <= step <= 2000 * (1 + 1e-9):
                truth[m] = true_fid(g, step)
        best_true = min(truth, key=truth.get)
        # noise is 2%: only demand agreement where the truth is not a near tie
        others = [v for k, v in truth.items() if k != best_true]
        if not others or min(others) > 1.1 * truth[best_true]:
            assert best_at(front, c) == best_true, c
    fit = analysis.fit_frontier(df, n_boot=100)
    assert fit.b < 0 and fit.b_ci[0] <= fit.b <= fit.b_ci[1]
    ex = analysis.extrapolate(fit, 10 * df["train_compute"].max())
    assert ex.lo <= ex.value <= ex.hi and ex.value < df["fid"].min()


def test_sampling_compute_doubles_with_guidance(tmp_path):
    write_sweep(tmp_path, "samp", conditioning_ablation=False, sampling=True)
    study = analysis.sampling_study(load_results(tmp_path, "samp"))
    assert set(study["step"]) == {2000}
    g = study["gflops"] * study["sampling_steps"]
    guided = study["cfg_scale"] > 1
    assert guided.any() and (~guided).any()
    np.testing.assert_allclose(study.loc[guided, "sampling_compute"], 2 * g[guided])
    np.testing.assert_allclose(study.loc[~guided, "sampling_compute"], g[~guided])


def test_loader_partial_sweep_names_missing_runs(tmp_path):
    ids = write_sweep(tmp_path, "part", n_missing=2)
    res = load_sweep(tmp_path, "part")
    assert set(res.missing) == set(ids["missing"])
    assert "no evaluation yet" in res.missing[ids["missing"][0]]
    assert "no run folder" in res.missing[ids["missing"][1]]
    assert set(res.frame["run_id"]) == set(ids["evaluated"])
    assert list(res.frame.columns) == COLUMNS
    row = res.frame.iloc[0]
    assert row["train_compute"] == pytest.approx(row["gflops"] * BATCH * row["step"] * 3)
    assert res.spec_text and "name: part" in res.spec_text


def test_loader_empty_sweep_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    with pytest.raises(HarnessError, match=r"no evaluation records for sweep 'empty'.*harness sweep"):
        load_results(tmp_path, "empty")
    with pytest.raises(HarnessError, match="empty"):
        load_results(tmp_path / "nowhere", "empty")


def test_sweep_name_from_yaml_or_bare(tmp_path):
    spec = tmp_path / "mine.yaml"
    spec.write_text("name: gflops\nmodels: [DiT-S/2]\n")
    assert sweep_name(spec) == "gflops"
    assert sweep_name("mini") == "mini"
    (tmp_path / "unnamed.yaml").write_text("models: [DiT-S/2]\n")
    assert sweep_name(tmp_path / "unnamed.yaml") == "unnamed"  # as load_spec names it: the file's stem
    (tmp_path / "bad.yaml").write_text("name: ''\nmodels: []\n")
    with pytest.raises(HarnessError, match="'name'"):
        sweep_name(tmp_path / "bad.yaml")
    with pytest.raises(HarnessError, match="not found"):
        sweep_name(tmp_path / "absent.yaml")


def test_patch_pairs_and_conditioning_ranking():
    from harness.study.analysis import conditioning_ranking, patch_pairs

    models = pd.DataFrame({
        "model": ["A/4", "A/2", "B/8", "B/4", "B/2", "C/2", "B/2", "B/2"],
        "size": ["A", "A", "B", "B", "B", "C", "B", "B"],
        "patch": [4, 2, 8, 4, 2, 2, 2, 2],
        "conditioning": ["adaLN-Zero"] * 6 + ["adaLN", "in-context"],
        "fid": [20.0, 25.0, 30.0, 12.0, 8.0, 5.0, 9.0, 14.0],
        "fid_se": [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.5],
    })
    pairs = patch_pairs(models[models["conditioning"] == "adaLN-Zero"])
    assert [(p["size"], p["small_patch"], p["large_patch"], p["smaller_wins"]) for p in pairs] == [
        ("A", 2, 4, False), ("B", 2, 4, True), ("B", 4, 8, True)]  # C has one patch: no pair
    # 25 vs 20 with se 1 each: |5| > 1.645 * 1.41 -> resolved; 8 vs 12 (se .5): resolved
    assert [p["status"] for p in pairs] == ["resolved", "resolved", "resolved"]
    assert conditioning_ranking(models) == {"B/2": [("adaLN-Zero", 8.0, 0.5), ("adaLN", 9.0, 2.0),
                                                    ("in-context", 14.0, 0.5)]}


def test_compare_needs_the_interval_to_separate():
    from harness.study.analysis import compare

    assert compare(10.0, 1.0, 12.0, 1.0) == "not resolved at this budget"  # 2 < 1.645 * 1.414
    assert compare(10.0, 1.0, 13.0, 1.0) == "resolved"                     # 3 > 2.33
    assert compare(10.0, float("nan"), 13.0, 1.0) == "no uncertainty recorded"
