"""Back-tests and the compute-optimal view: on the paper's Table 4 (the issue's targets) and on
sweeps the harness's own record writer produced (tests/report_synth.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from harness import forecast, forecast_table
from harness.compute_optimal import compute_optimal
from harness.cli import main


def _paper(capsys, spec: str) -> dict:
    assert main(["forecast", "--paper", "--hold-out", spec, "--n-boot", "100", "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_paper_largest_2_chosen_law_within_10pct_and_inside_its_intervals(capsys):
    """Done-when: L/2 and XL/2 held out; the law chosen inside the other 10 models predicts both within
    10% and inside its 90% intervals. Every candidate's numbers are in the JSON (and the report)."""
    res = _paper(capsys, "largest:2")
    assert res["test"] == ["DiT-L/2", "DiT-XL/2"] and len(res["train"]) == 10
    best = next(c for c in res["candidates"] if c["chosen"])
    assert best["law"] == res["chosen"]
    errs = {p["name"]: (p["error_pct"], p["covered"]) for p in best["predictions"]}
    assert all(abs(e) < 10 and cov for e, cov in errs.values()), (res["chosen"], errs)


@pytest.mark.slow
def test_paper_largest_3_chosen_law_within_20pct(capsys):
    res = _paper(capsys, "largest:3")
    best = next(c for c in res["candidates"] if c["chosen"])
    errs = {p["name"]: p["error_pct"] for p in best["predictions"]}
    assert set(errs) == {"DiT-XL/4", "DiT-L/2", "DiT-XL/2"}
    assert all(abs(e) < 20 for e in errs.values()), (res["chosen"], errs)


def test_hold_out_specs_select_the_named_runs():
    pts = forecast_table.paper_points()
    assert sorted(pts.loc[forecast.held_out(pts, "largest:2"), "name"]) == ["DiT-L/2", "DiT-XL/2"]
    assert set(pts.loc[forecast.held_out(pts, "size:XL"), "name"]) == {"DiT-XL/8", "DiT-XL/4", "DiT-XL/2"}
    assert forecast.held_out(pts, "patch:2").sum() == 4
    assert list(pts.loc[forecast.held_out(pts, "DiT-B/2,DiT-S/8"), "name"]) == ["DiT-S/8", "DiT-B/2"]


@pytest.mark.parametrize("spec,msg", [("largest:x", "whole number"), ("largest:11", "whole number"),
                                      ("DiT-Q/3", "not a model or run"), ("size:Z", "holds out 0")])
def test_bad_hold_out_is_one_clear_line(spec, msg, capsys):
    assert main(["forecast", "--paper", "--hold-out", spec]) == 2
    err = capsys.readouterr().err
    assert "--hold-out" in err and msg in err and "Traceback" not in err


def test_forecast_needs_a_sweep_or_paper(capsys):
    assert main(["forecast", "--hold-out", "largest:1"]) == 2
    assert "--paper or --table" in capsys.readouterr().err


def test_backtest_on_a_recorded_sweep_and_compute_optimal(tmp_path):
    """A sweep written by the record writer with 6 models on a known law: the back-test runs end to
    end with strict JSON, and the compute-optimal slope is positive (bigger models win later)."""
    from report_synth import write_scaling_sweep
    from harness.results import load_sweep

    write_scaling_sweep(tmp_path)
    frame = load_sweep(tmp_path, "scaling").frame
    points, step = forecast.sweep_points(frame)
    assert len(points) == 6 and step == frame["step"].max()
    res = forecast.backtest(points, "largest:1", n_boot=30)
    json.dumps(forecast._finite(res), allow_nan=False)
    best = next(c for c in res["candidates"] if c["default"])
    assert best["law"] == res["default"] and len(best["predictions"]) == 1
    co = compute_optimal(frame, n_boot=100)
    assert co is not None and not co.why_not
    assert co.slope > 0 and co.best[0] != co.best[-1]
    # never read past a run's last checkpoint: budgets beyond a curve are NaN for that model
    last = frame.groupby("model")["train_compute"].max()
    for i, m in enumerate(co.models):
        assert np.all(np.isnan(co.fid[i, co.budgets > last[m] * 1.0001]))
