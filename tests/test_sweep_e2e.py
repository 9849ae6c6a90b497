"""`harness sweep` end to end through real local submitit processes: a sweep killed midway and run
again, a sweep stopped by SIGTERM, a failing run and its resubmission, and sweeps/smoke.yaml with its
closing report (the code path of `make sweep`)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.config.layout import load_state
from harness.launch.status import is_complete
from harness.io import read_jsonl
from harness.config.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"
def subprocess_env(**extra: str) -> dict:
    """The subprocesses' environment, read at call time so it carries the test's own HARNESS_CACHE."""
    return dict(os.environ, OMP_NUM_THREADS="1", HARNESS_POLL_S="0.3", PYTHONPATH=str(ROOT), **extra)


def derived_spec(tmp_path: Path, name: str, models: list[str] | None = None, **changes: dict) -> Path:
    """A copy of sweeps/smoke.yaml named `name`, with the given sections updated."""
    doc = yaml.safe_load(SMOKE.read_text())
    doc["name"] = name
    if models:
        doc["models"] = models
    for section, values in changes.items():
        doc[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def sweep_cmd(spec: Path, results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness", "sweep", str(spec), "--launcher", "local",
            "--results", str(results), *extra]


def start_sweep(spec: Path, results: Path) -> subprocess.Popen:
    """`harness sweep` in its own process group (its local jobs inherit the group), its training
    slowed to >= 15 s per run so that a kill always lands mid-training (a tiny run takes ~3 s)."""
    env = subprocess_env(HARNESS_TEST_STEP_DELAY_S="0.05")
    return subprocess.Popen(sweep_cmd(spec, results, "--no-report"), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_sweep(spec: Path, results: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_cmd(spec, results, *extra), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def wait_for_checkpoint(proc: subprocess.Popen, runs: Path, count: int = 2, timeout: float = 180) -> None:
    """Wait until `count` runs each have a checkpoint: a run killed before its first checkpoint
    must start again from step 0, which would make "never trained twice from scratch" untestable."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        # a checkpoint counts once its checksum sidecar exists (written after the .pt): a kill between
        # the two leaves an invalid checkpoint, and the run rightly starts again from step 0
        if runs.is_dir() and sum(any(d.glob("checkpoints/step_*.pt.sha256")) for d in runs.iterdir()) >= count:
            return
        if proc.poll() is not None:
            pytest.fail("the sweep ended before every run had a checkpoint:\n" + proc.communicate()[0])
        time.sleep(0.05)
    pytest.fail(f"fewer than {count} runs with a checkpoint under {runs} within {timeout}s")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_group_gone(pgid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not group_alive(pgid):
            return True
        time.sleep(0.1)
    return False


def assert_records_whole(spec_path: Path, results: Path) -> dict[str, list[int]]:
    """Every run done with all its eval records, each (step, setting) exactly once, and no run trained
    twice from scratch. Returns each run's logged train steps."""
    spec = load_spec(spec_path)
    steps_by_run = {}
    for run in spec.expand():
        rdir = results / spec.name / "runs" / run.run_id
        assert is_complete(run, rdir), f"{run.run_id} is not complete"
        assert json.loads((rdir / "done").read_text())["step"] == run.train.steps
        steps = [r["step"] for r in read_jsonl(rdir / "train.jsonl")]
        first = run.train.log_every
        assert steps and steps[0] == first and steps.count(first) == 1, steps  # trained from scratch once
        assert steps[-1] == run.train.steps and max(steps) == run.train.steps
        # a resume repeats at most the steps since the last checkpoint, never the run's start
        for prev, cur in zip(steps, steps[1:]):
            assert cur > prev or cur > prev - run.train.ckpt_every, steps
        evals = [(r["step"], r["sampling_steps"], r["cfg_scale"]) for r in read_jsonl(rdir / "eval.jsonl")]
        want = {(s, k, c) for s in run.eval.at_steps for k in run.eval.sampling_steps for c in run.eval.cfg_scales}
        assert sorted(evals) == sorted(want), evals  # none lost, none duplicated
        steps_by_run[run.run_id] = steps
    return steps_by_run


def _long_spec(tmp_path: Path, name: str) -> Path:
    # 300 steps, a checkpoint every 20: ~3 s per run when rerun, >= 15 s while start_sweep slows it
    return derived_spec(tmp_path, name, train={"steps": 300, "ckpt_every": 20, "log_every": 10},
                        eval={"at_steps": [150, 300]}, launcher={"max_concurrent_local": 2})


# --------------------------------------------------------------------------- killed midway
@pytest.mark.slow
def test_sweep_killed_with_its_jobs_then_rerun_completes(tmp_path):
    """SIGKILL to the sweep's whole process group (a lost session, the OOM killer), then the same
    command again: both runs (2 local jobs at once) finish from their checkpoints, records whole."""
    spec = _long_spec(tmp_path, "killed")
    results = tmp_path / "results"
    runs = results / "killed" / "runs"
    proc = start_sweep(spec, results)
    wait_for_checkpoint(proc, runs)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert wait_group_gone(proc.pid, 10), "processes of the killed sweep survived"
    assert not any(runs.glob("*/done")), "a run finished before the kill; the test proves nothing"
    first_ids = {k: v["job_id"] for k, v in load_state(results / "killed")["runs"].items()}

    t0 = time.time()
    again = run_sweep(spec, results, "--no-report")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 done" in again.stdout
    steps = assert_records_whole(spec, results)
    resumed = 0
    for run_id, logged in steps.items():
        log_text = (runs / run_id / "logs" / "job.log").read_text()
        resumed += "resumed" in log_text
    assert resumed >= 1, "no run resumed from a checkpoint"
    # max_concurrent_local: 2 -- the rerun started the second job before the first one finished
    state = load_state(results / "killed")["runs"]
    assert all(state[r]["job_id"] != first_ids.get(r) for r in state) and all(e["attempts"] == 2 for e in state.values())
    started = sorted(e["submitted"] for e in state.values())
    ended = min((runs / r / "done").stat().st_mtime for r in state)
    assert t0 <= started[0] <= started[1] < ended


@pytest.mark.slow
def test_sweep_stopped_by_sigterm_stops_its_jobs_then_rerun_completes(tmp_path):
    """`kill PID` of `harness sweep` alone: its local jobs are stopped (no orphan keeps training),
    `harness status` says why, and the rerun resumes and completes without duplicate records."""
    spec = _long_spec(tmp_path, "termed")
    results = tmp_path / "results"
    runs = results / "termed" / "runs"
    proc = start_sweep(spec, results)
    wait_for_checkpoint(proc, runs)
    os.kill(proc.pid, signal.SIGTERM)  # the parent only
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0, out
    # the sweep waits for its jobs before it exits: nothing of it may still be training now
    assert wait_group_gone(proc.pid, 3), "local jobs kept running after the sweep was stopped"
    logged = {p: p.read_text() for p in runs.glob("*/train.jsonl")}
    time.sleep(2)
    assert logged and all(p.read_text() == text for p, text in logged.items()), "a job still trains"
    assert not any(runs.glob("*/done")), "a run finished although the sweep was stopped mid-training"
    status = subprocess.run([sys.executable, "-m", "harness", "status", str(spec), "--results", str(results)],
                            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "harness sweep was stopped" in status.stdout, status.stdout

    again = run_sweep(spec, results, "--no-report")
    assert again.returncode == 0, again.stdout + again.stderr
    assert_records_whole(spec, results)


# --------------------------------------------------------------------------- failure and resubmission
@pytest.mark.slow
def test_failing_run_shows_its_reason_and_is_resubmitted(tmp_path):
    """A learning rate of 1 (the spec's largest) makes the loss non-finite within a few steps: the trainer's NaN
    stop (a HarnessError) fails the job, `harness status` shows it failed with that reason, and the next sweep
    resubmits it."""
    spec = derived_spec(tmp_path, "diverge", models=["DiT-2x32x2/4"],
                        train={"steps": 20, "lr": 1.0, "warmup_steps": 0}, eval={"at_steps": [20]})
    results = tmp_path / "results"
    first = run_sweep(spec, results, "--no-report")
    assert first.returncode == 1, first.stdout + first.stderr
    status = subprocess.run([sys.executable, "-m", "harness", "status", str(spec), "--results", str(results)],
                            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    [row] = [line for line in status.stdout.splitlines() if line.startswith("DiT-")]
    assert " failed " in row and "NaN or Inf" in row, status.stdout
    [entry] = load_state(results / "diverge")["runs"].values()
    assert entry["attempts"] == 1 and "NaN or Inf" in entry["reason"]

    second = run_sweep(spec, results, "--no-report")
    assert second.returncode == 1
    [entry2] = load_state(results / "diverge")["runs"].values()
    assert entry2["attempts"] == 2 and entry2["job_id"] != entry["job_id"]  # resubmitted, failed again
    assert "NaN or Inf" in entry2["reason"]


# --------------------------------------------------------------------------- issue 8: smoke, report included
@pytest.mark.slow
def test_smoke_sweep_end_to_end_with_report(tmp_path):
    """sweeps/smoke.yaml as `make sweep` runs it: spec, local dispatch, training, evaluation, records
    and the closing report (no --no-report)."""
    results, reports = tmp_path / "results", tmp_path / "reports"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "harness", "sweep", str(SMOKE), "--results", str(results),
                           "--reports", str(reports)], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=240)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spec = load_spec(SMOKE)
    runs = spec.expand()
    assert len(runs) == 2
    for run in runs:
        rdir = results / "smoke" / "runs" / run.run_id
        record = json.loads((rdir / "run.json").read_text())
        assert record["run_id"] == run.run_id and record["model"] == run.model and record["gflops"] > 0
        assert [r["step"] for r in read_jsonl(rdir / "train.jsonl")][-1] == run.train.steps
        evals = list(read_jsonl(rdir / "eval.jsonl"))
        assert sorted(r["step"] for r in evals) == sorted(run.eval.at_steps)
        for r in evals:
            for metric in ("fid", "precision", "recall"):
                assert isinstance(r[metric], float) and math.isfinite(r[metric]), r
            assert r["fid"] >= 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
            assert r["num_samples"] == 100 and r["feature_space"] == "digits"
    out = reports / "smoke"
    for name in ("index.html", "report.pdf", "results.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "report.pdf").read_bytes()[:5] == b"%PDF-"
    csv = (out / "results.csv").read_text()
    assert all(run.run_id in csv for run in runs)
    assert not (tmp_path / "reports").exists() or (tmp_path / "reports") == reports
    assert str(out / "index.html") in proc.stdout
    # the throughput table reads what the trainer logged: images/s, micro-batch, eager on the CPU
    html = (out / "index.html").read_text()
    table = html[html.index("Training throughput"):]
    table = table[:table.index("</table>")]
    for run in runs:
        logged = [r["images_per_s"] for r in read_jsonl(results / "smoke" / "runs" / run.run_id / "train.jsonl")]
        assert run.run_id in table and f"{statistics.median(logged[1:]):.4g}" in table
    assert table.count("<td>32</td>") == 2 and table.count("<td>eager</td>") == 2  # whole batch of 32, CPU
    print(f"smoke sweep end to end: {wall:.1f} s")  # a measurement, not a check: timings belong in benchmarks


# --------------------------------------------------------------------------- issue 14: a real partial sweep's report
def wait_for_file(proc: subprocess.Popen, root: Path, pattern: str, timeout: float = 180) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = sorted(root.glob(pattern)) if root.is_dir() else []
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before {root}/{pattern} appeared:\n" + proc.communicate()[0])
        time.sleep(0.05)
    pytest.fail(f"{root}/{pattern} did not appear within {timeout}s")


@pytest.mark.slow
def test_partial_real_sweep_report_lists_missing_runs_and_shows_the_spec(tmp_path):
    """A real `harness sweep` of three runs (one local job at a time) stopped once the first run has
    its first evaluation: the other two never started. One of them is removed from disk. The report
    reads sweep.json and spec.yaml as `harness sweep` wrote them: it lists both as missing and shows
    the spec."""
    spec_path = derived_spec(tmp_path, "partial", models=["DiT-2x32x2/4"],
                             train={"steps": 200, "ckpt_every": 10, "log_every": 10}, eval={"at_steps": [10, 200]})
    doc = yaml.safe_load(spec_path.read_text())
    doc["seeds"] = [0, 1, 2]
    spec_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = load_spec(spec_path)
    results, reports = tmp_path / "results", tmp_path / "reports"
    runs = results / "partial" / "runs"
    proc = start_sweep(spec_path, results)
    first_eval = wait_for_file(proc, runs, "*/eval.jsonl")
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=60)
    evaluated = first_eval.parent.name
    never = sorted(r.run_id for r in spec.expand() if r.run_id != evaluated)
    assert len(never) == 2
    for rid in never:  # queued behind the first run: never trained
        assert not (runs / rid / "train.jsonl").exists() and not (runs / rid / "eval.jsonl").exists()
    removed, not_started = never
    shutil.rmtree(runs / removed)
    assert json.loads((results / "partial" / "sweep.json").read_text())["runs"] == [r.run_id for r in spec.expand()]

    rep = subprocess.run([sys.executable, "-m", "harness", "report", str(spec_path), "--results", str(results),
                          "--out", str(reports)], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=240)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert "2 run(s) missing" in rep.stdout
    html = (reports / "partial" / "index.html").read_text()
    missing = html[html.index('<section id="missing"'):]
    missing = missing[:missing.index("</section>")]
    assert f"<code>{removed}</code></td><td>no run folder" in missing
    assert f"<code>{not_started}</code></td><td>no evaluation yet" in missing
    assert evaluated not in missing and "2 of 3 expected runs" in " ".join(missing.split())
    assert "name: partial" in html and spec_path.read_text().splitlines()[-1].strip() in html  # the spec as run
