"""Slurm edge cases on the local cluster (issue 28, finding 6): an array task cancelled while pending
is failed at once and resubmitted by the next sweep; `--launcher local` refuses while the sweep's
Slurm jobs are queued; a task killed by SIGKILL says so in its reason."""
from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.launch.dispatch import dispatch
from harness.config.layout import load_state, sweep_dir
from harness.config.spec import load_spec
from harness.launch.status import job_reason, run_statuses
from slurm_tools import need_slurm, wait_until

pytestmark = pytest.mark.slurm

# held back an hour by --begin: the array's tasks stay pending (nothing trains) until cancelled
HELD = """\
name: {name}
models: [DiT-2x32x2/4, DiT-2x32x2/2]
data: {{dataset: digits, image_size: 8}}
train: {{steps: 4, global_batch: 16, lr: 1.0e-3, ckpt_every: 2, log_every: 2, keep_last: 2}}
eval: {{at_steps: [4], num_samples: 10, sampling_steps: [2], sampler: ddim, metrics: [fid], batch_size: 10}}
launcher: {{kind: slurm, cpus_per_task: 1, mem_gb: 1, timeout_min: 5, additional: {{begin: now+1hour}}}}
"""


@pytest.fixture
def held_sweep(tmp_path):
    """A two-run Slurm sweep dispatched without waiting, its tasks held pending; cancelled afterwards."""
    need_slurm()
    path = tmp_path / "held.yaml"
    path.write_text(HELD.format(name=f"held{uuid.uuid4().hex[:6]}"))
    spec, results = load_spec(path), tmp_path / "results"
    statuses = dispatch(spec, results, wait=False)
    yield spec, results, statuses
    # every job the sweep submitted, the held latent jobs included, has its folder under jobs/ ("ID" or
    # "ARRAY_4294967294"); scancel cancels nothing if one id is invalid
    ids = {p.name.split("_")[0] for p in (sweep_dir(results, spec.name) / "jobs").iterdir() if p.is_dir()}
    subprocess.run(["scancel", *sorted(i for i in ids if i.isdigit())], timeout=30)


def test_task_cancelled_while_pending_fails_at_once_and_is_resubmitted(held_sweep):
    """Slurm drops a pending array task that is cancelled: squeue and sacct never list it again (sacct
    keeps one record "A_[1]" for the array's unstarted tasks). It must not count as queued."""
    spec, results, statuses = held_sweep
    assert [s.state for s in statuses] == ["pending", "pending"], statuses
    cancelled, kept = statuses
    subprocess.run(["scancel", cancelled.job_id], check=True, timeout=30)
    now = {s.run.run_id: s for s in run_statuses(spec, results)}  # no grace period: at once
    assert now[cancelled.run.run_id].state == "failed", now
    assert now[cancelled.run.run_id].reason.startswith(f"CANCELLED while pending: job {cancelled.job_id} left")
    assert now[kept.run.run_id].state == "pending"

    again = {s.run.run_id: s for s in dispatch(spec, results, wait=False)}  # resubmits it, keeps the other
    assert again[cancelled.run.run_id].state == "pending"
    assert again[cancelled.run.run_id].job_id != cancelled.job_id
    assert again[kept.run.run_id].job_id == kept.job_id
    entries = load_state(sweep_dir(results, spec.name))["runs"]
    assert entries[cancelled.run.run_id]["attempts"] == 2 and entries[kept.run.run_id]["attempts"] == 1


def test_whole_array_cancelled_while_pending_is_cancelled(held_sweep):
    """Cancelling the array while all its tasks pend: once the controller forgets them, sacct's one
    record "A_[0-1]" says CANCELLED for both (the task ids are read from the brackets)."""
    from harness.launch.status import _array_record

    spec, results, statuses = held_sweep
    subprocess.run(["scancel", statuses[0].job_id.split("_")[0]], check=True, timeout=30)
    wait_until(lambda: all(s.state == "failed" for s in run_statuses(spec, results)), 30, "both runs failed")
    assert all(s.reason.startswith("CANCELLED") for s in run_statuses(spec, results))
    array = statuses[0].job_id.split("_")[0]
    records = {f"{array}_[0-1,3%2]": "CANCELLED", f"{array}_4": "RUNNING"}
    assert [_array_record(f"{array}_{t}", records) for t in range(5)] == ["CANCELLED"] * 2 + [None, "CANCELLED", None]


def test_local_launcher_refuses_while_slurm_jobs_of_the_sweep_are_queued(held_sweep):
    spec, results, statuses = held_sweep
    state_before = (sweep_dir(results, spec.name) / "sweep_state.json").read_text()
    proc = subprocess.run([sys.executable, "-m", "harness", "sweep", str(spec.path), "--launcher", "local",
                           "--results", str(results)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if not x[:2].isdigit()]  # the rest are timestamped logs
    assert "2 run(s) of sweep" in line and "queued or running on Slurm" in line, line
    assert all(s.job_id in line for s in statuses) and "scancel" in line and "harness status" in line, line
    assert "new" not in proc.stdout and not any((results / spec.name / "runs").glob("*/train.jsonl"))
    assert (sweep_dir(results, spec.name) / "sweep_state.json").read_text() == state_before


def test_task_killed_by_sigkill_names_the_signal(tmp_path):
    """A task under srun killed by `kill -9`: sacct says FAILED with ExitCode 9:0 (srun's exit status)
    and the step's 0:9 (the signal field); the reason names the signal."""
    need_slurm()
    naptime = f"61.{uuid.uuid4().int % 10**6}"  # a command line no other process has
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\nsrun sleep {naptime}\n")
    job_id = subprocess.run(["sbatch", "--parsable", "-n1", "-c1", "--mem=100M", "-t", "2", "-o",
                             str(tmp_path / "job.out"), str(script)], capture_output=True, text=True,
                            check=True, timeout=60).stdout.strip()
    try:
        pids = []

        def task_started() -> bool:
            pids[:] = subprocess.run(["pgrep", "-f", f"^[^ ]*sleep {naptime}$"], capture_output=True,
                                     text=True).stdout.split()
            return bool(pids)

        wait_until(task_started, 120, f"job {job_id}'s task to start", poll_s=0.2)
        subprocess.run(["kill", "-9", *pids], check=True)
        job = SimpleNamespace(job_id=job_id, paths=SimpleNamespace(result_pickle=tmp_path / "none.pkl"))
        wait_until(lambda: job_reason(job, "FAILED") != "FAILED", 60, "sacct to record the exit", poll_s=0.5)
        assert job_reason(job, "FAILED") == "FAILED: killed by signal 9 (SIGKILL)"
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
