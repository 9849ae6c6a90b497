"""The sweep job (harness.launch.job.SweepJob) as a real submitit job (local executor: a separate process with submitit's environment)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import submitit

from harness.io import read_jsonl
from harness.launch.job import SweepJob
from train_tiny import tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sweep_job_runs_under_submitit_and_requeues_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    ex = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="local")
    ex.update_parameters(timeout_min=5)
    run = tiny_run(steps=2)
    job = ex.submit(SweepJob(1), run.to_dict(), str(tmp_path / "run"))
    assert job.result() == str(tmp_path / "run")
    assert (tmp_path / "run" / "done").exists()
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "train.jsonl")] == [1, 2]
    # on preemption submitit calls checkpoint(): the same call is requeued (it resumes from disk)
    delayed = SweepJob(1).checkpoint(run.to_dict(), str(tmp_path / "run"))
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.args == (run.to_dict(), str(tmp_path / "run"), None)
