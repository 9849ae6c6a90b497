"""The report tests, on what the product itself wrote (issue 16): a real `harness sweep
sweeps/smoke.yaml --launcher debug` (training, evaluation, records, closing report), then the
checks of test_report.py and test_analysis.py that the synthetic folders (report_synth.py) feed,
against that output. Nothing here writes a record by hand."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from harness.io import read_jsonl
from harness.config.spec import load_spec
from test_report import SWEEP_FIGURES, _assert_not_blank, _need_pdf, _pdf_pages, assert_printable
from test_report_browser import CHROMEDRIVER, CHROMIUM, _open, _severe, assert_opens_with_headline, browser  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "sweeps" / "smoke.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    """(results root, reports root, the sweep's stdout) of one real debug-launcher smoke sweep."""
    tmp = tmp_path_factory.mktemp("real-sweep")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "harness", "sweep", str(SMOKE), "--launcher", "debug",
                           "--results", str(tmp / "results"), "--reports", str(tmp / "reports")],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "results", tmp / "reports", proc.stdout


def _eval_records(results: Path) -> dict[tuple[str, int], dict]:
    """(run_id, step) -> the eval.jsonl record the trainer wrote."""
    out = {}
    for run in load_spec(SMOKE).expand():
        for rec in read_jsonl(results / "smoke" / "runs" / run.run_id / "eval.jsonl"):
            out[run.run_id, int(rec["step"])] = rec
    return out


def test_report_of_a_real_sweep_files_figures_and_numbers(real_sweep):
    results, reports, stdout = real_sweep
    folder = reports / "smoke"
    manifest = json.loads((folder / "manifest.json").read_text())
    # one model family, one block, one sampling setting, two models (too few for the compute-optimal
    # view), two evaluated steps (too few for the stop-early back-test): the figures that apply, in order
    assert manifest["figures"] == [f for f in SWEEP_FIGURES
                                   if f not in ("conditioning", "sampling_compute", "compute_optimal", "stop_early")
                                   ] + ["timeline"]  # the trainer's clock is in real records only
    for name in manifest["figures"]:
        png = Image.open(folder / "figures" / f"{name}.png")
        assert png.width > 300 and png.height > 200
        assert (folder / "figures" / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    # the table holds exactly the trainer's evaluation records, numbers unchanged
    records = _eval_records(results)
    runs = load_spec(SMOKE).expand()
    assert len(records) == len(runs) * len(runs[0].eval.at_steps)
    table = pd.read_csv(folder / "results.csv")
    assert len(table) == len(records)
    for row in table.itertuples():
        rec = records[row.run_id, int(row.step)]
        assert row.fid == pytest.approx(rec["fid"], rel=1e-12) and math.isfinite(row.fid)
        assert row.precision == pytest.approx(rec["precision"]) and row.feature_space == rec["feature_space"]
        run_json = json.loads((results / "smoke" / "runs" / row.run_id / "run.json").read_text())
        assert row.gflops == pytest.approx(run_json["gflops"]) and row.model == run_json["model"]
    assert str(folder / "index.html") in stdout
    assert not list(folder.glob(".*.tmp"))


def test_report_html_of_a_real_sweep(real_sweep):
    results, reports, _ = real_sweep
    folder = reports / "smoke"
    manifest = json.loads((folder / "manifest.json").read_text())
    html = (folder / "index.html").read_text()
    for src in re.findall(r'<img src="([^"]+)"', html):
        assert (folder / src).is_file(), src
    assert len(re.findall(r"<img ", html)) == len(manifest["figures"])
    assert "Missing runs" not in html and manifest["missing"] == {}  # every run finished
    for run in load_spec(SMOKE).expand():
        assert run.run_id in html
    assert manifest["git_revision"] in html
    assert "<td>digits</td>" in html
    # the samples figure shows the grids the trainer wrote
    grids = sorted((results / "smoke" / "runs").glob("*/samples/grid_step_*.png"))
    assert grids and "samples" in manifest["figures"]


def test_report_of_a_real_sweep_shows_its_spec(real_sweep):
    results, reports, _ = real_sweep
    if not (results / "smoke" / "spec.yaml").is_file():
        pytest.xfail("harness sweep does not write results/<sweep>/spec.yaml yet (the run-folder contract)")
    html = (reports / "smoke" / "index.html").read_text()
    assert "name: smoke" in html


def test_report_of_a_real_sweep_lists_a_lost_run_as_missing(real_sweep, tmp_path):
    """One run folder of the real output removed: the report still renders and names it missing."""
    from harness.report import render_sweep_report

    results, _, _ = real_sweep
    if not (results / "smoke" / "sweep.json").is_file():
        pytest.xfail("harness sweep does not write results/<sweep>/sweep.json yet (the run-folder contract)")
    copy = tmp_path / "results"
    shutil.copytree(results, copy, symlinks=True)  # logs/ holds links to job folders
    lost = load_spec(SMOKE).expand()[0].run_id
    shutil.rmtree(copy / "smoke" / "runs" / lost)
    manifest = render_sweep_report(copy, "smoke", tmp_path / "reports", n_boot=20)
    assert lost in manifest["missing"]
    assert lost in (tmp_path / "reports" / "smoke" / "index.html").read_text()


def test_analysis_loads_a_real_sweep(real_sweep):
    from harness.study.results import load_sweep

    results, _, _ = real_sweep
    sweep = load_sweep(results, "smoke")
    records = _eval_records(results)
    assert len(sweep.frame) == len(records)
    assert set(sweep.frame["run_id"]) == {rid for rid, _ in records}
    assert (sweep.frame["gflops"] > 0).all() and (sweep.frame["train_compute"] > 0).all()


def test_a_real_sweep_keeps_its_features_and_compares_its_patch_pair_by_the_paired_error(real_sweep):
    """Every record names the features its FID came from; the two models' records share their noise, so the
    report judges the patch pair by the paired error of the difference."""
    import numpy as np

    from harness.config.layout import RunFolder
    from harness.metrics import get_feature_extractor, load_reference
    from harness.metrics.stats import frechet_distance, gaussian_stats

    results, reports, _ = real_sweep
    ref = load_reference("digits", get_feature_extractor("digits", device="cpu"), image_size=8)
    for (rid, _), rec in _eval_records(results).items():
        feats = np.load(RunFolder(results / "smoke" / "runs" / rid).features_file(rec["fid_features"]),
                        allow_pickle=False)
        assert feats.shape == (rec["num_samples"], 32) and feats.dtype == np.float32
        assert frechet_distance(*gaussian_stats(feats), ref.mu, ref.sigma) == pytest.approx(rec["fid"], rel=1e-9)
    html = (reports / "smoke" / "index.html").read_text()
    assert "1 of 1 FID comparisons used the paired standard error" in html
    assert "1.645 paired SE" in html


@pytest.mark.system
def test_report_pdf_of_a_real_sweep(real_sweep, tmp_path):
    """A4 throughout, nothing under 8 pt, page 1 opens with the headline figure and the findings."""
    _, reports, _ = real_sweep
    manifest = json.loads((reports / "smoke" / "manifest.json").read_text())
    _need_pdf(manifest)
    sizes = assert_printable(reports / "smoke" / "report.pdf")
    page1 = " ".join(w for p, w, _ in sizes if p == 1)
    assert "FID vs transformer Gflops" in page1 and "Findings and their uncertainty" in page1
    _assert_not_blank(_pdf_pages(reports / "smoke" / "report.pdf", tmp_path))


@pytest.mark.browser
def test_real_sweep_report_as_a_person_reads_it(real_sweep, request):
    """In headless Chromium: the headline first, then the findings; the trainer's loss curves, every metric
    over training, real and generated grids, and a cost table with one row per run and the total."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian chromium + chromium-driver: apt-get install -y chromium chromium-driver")
    driver = request.getfixturevalue("browser")
    results, reports, _ = real_sweep
    driver.get_log("browser")
    images = _open(driver, reports / "smoke" / "index.html")
    assert images and all(i["complete"] and i["w"] > 0 for i in images), images
    assert not _severe(driver), _severe(driver)
    assert_opens_with_headline(driver)
    for name in ("training_loss", "metrics_vs_steps", "metrics_vs_compute", "samples"):
        assert driver.find_element("css selector", f"#fig-{name} img").is_displayed(), name
    svg = (reports / "smoke" / "figures" / "training_loss.svg").read_text()
    assert "loss (mse + vb)" in svg and "vb (variational bound)" in svg
    metrics = (reports / "smoke" / "figures" / "metrics_vs_steps.svg").read_text()
    assert "Precision" in metrics and "Recall" in metrics and "FID" in metrics
    assert "real training images" in (reports / "smoke" / "figures" / "samples.svg").read_text()
    cost = driver.find_element("css selector", "#cost table")
    rows = [r.text for r in cost.find_elements("css selector", "tbody tr")]
    runs = load_spec(SMOKE).expand()
    assert len(rows) == len(runs) + 1 and rows[-1].startswith("all runs"), rows
    # the total is the sum of the runs' device-hours, as the table prints them (3 significant digits)
    hours = [float(r.find_elements("css selector", "td")[5].text) for r in cost.find_elements("css selector", "tbody tr")]
    assert hours[-1] == pytest.approx(sum(hours[:-1]), rel=0.02) and hours[-1] > 0


def test_status_reads_pace_and_latest_fid_from_what_the_trainer_wrote(real_sweep):
    """`harness status` of the real sweep: per run the last FID with its step, the summed training wall time and
    the last logged images/s, as train.jsonl and eval.jsonl hold them; no ETA for a finished run."""
    from harness.launch.status import run_progress

    results, _, _ = real_sweep
    proc = subprocess.run([sys.executable, "-m", "harness", "status", str(SMOKE), "--results", str(results)],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["run_id", "state", "gpus", "step", "evals", "fid", "elapsed", "img/s", "eta", "job",
                              "reason"]
    for run in load_spec(SMOKE).expand():
        rdir = results / "smoke" / "runs" / run.run_id
        train = list(read_jsonl(rdir / "train.jsonl"))
        last_eval = [r for r in read_jsonl(rdir / "eval.jsonl") if r.get("fid") is not None][-1]
        p = run_progress(rdir)
        assert (p.fid, p.fid_step) == (last_eval["fid"], last_eval["step"])
        assert p.images_per_s == train[-1]["images_per_s"] and p.elapsed_s == train[-1]["wall_s"]  # one attempt
        (row,) = [r.split() for r in rows if r.startswith(run.run_id)]
        assert row[1] == "done" and row[2] == "-"  # a debug-launcher run: no GPUs sized
        assert row[5] == f"{last_eval['fid']:.2f}@{last_eval['step']}"
        assert row[7] == f"{train[-1]['images_per_s']:,.0f}" and row[8] == "-"


def test_elapsed_time_sums_the_attempts_of_a_resumed_run(tmp_path):
    """wall_s restarts at 0 in each attempt (the trainer's clock starts with its process)."""
    from harness.io import append_jsonl
    from harness.launch.status import run_progress

    log = tmp_path / "train.jsonl"
    for step, wall in ((10, 5.0), (20, 9.0), (20, 2.0), (30, 6.5)):  # killed after 9 s, resumed for 6.5 s
        append_jsonl(log, {"step": step, "wall_s": wall, "images_per_s": 100.0 + step, "steps_per_s": 1.0})
    p = run_progress(tmp_path)
    assert p.elapsed_s == 9.0 + 6.5 and p.images_per_s == 130.0 and p.fid is None


def test_the_timeline_draws_each_run_from_the_trainers_clock(real_sweep):
    """The report's Gantt chart of the real sweep: one bar a run, from its first log line's time less its wall
    clock to its last line, evaluation after it; no planned bars for a sweep that asks for no GPUs."""
    from harness.report.timeline import attempts, measured_spans, planned_schedule
    from harness.study.results import load_sweep

    results, reports, _ = real_sweep
    manifest = json.loads((reports / "smoke" / "manifest.json").read_text())
    assert "timeline" in manifest["figures"]
    res = load_sweep(results, "smoke")
    spans = measured_spans(res)
    for run in load_spec(SMOKE).expand():
        train = list(read_jsonl(results / "smoke" / "runs" / run.run_id / "train.jsonl"))
        (start, end, kind), (_, eval_end, eval_kind) = spans[run.run_id]
        assert (kind, eval_kind) == ("train", "eval")
        assert start == train[0]["time"] - train[0]["wall_s"] and end == train[-1]["time"] <= eval_end
    assert planned_schedule(res) is None


def test_attempts_split_where_the_wall_clock_restarts():
    import pandas as pd

    from harness.report.timeline import attempts

    log = pd.DataFrame({"time": [105.0, 110.0, 202.0, 206.0], "wall_s": [5.0, 10.0, 2.0, 6.0]})
    assert attempts(log) == [(100.0, 110.0), (200.0, 206.0)]
