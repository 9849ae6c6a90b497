"""The local Slurm cluster of scripts/local-slurm.sh: sbatch runs a job and sacct records how it ended."""
from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def _need_cluster() -> None:
    if shutil.which("sinfo") is None:
        pytest.skip("Slurm is not installed: `sinfo` is absent (start one with `sudo scripts/local-slurm.sh`)")
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.skip(f"no Slurm controller answers `sinfo` ({proc.stderr.strip()[:200]}); "
                    "start one with `sudo scripts/local-slurm.sh`")


def _sbatch(*args: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _sacct_state(job_id: str) -> str | None:
    proc = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                          capture_output=True, text=True, timeout=30)
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return lines[0].split()[0] if lines else None


def _wait_state(job_id: str, done: tuple[str, ...], timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = _sacct_state(job_id)
        if state in done:
            return state
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not reach {done} in {timeout}s; last sacct state {state!r}")


def test_sbatch_sacct_round_trip(tmp_path: Path):
    _need_cluster()
    token = uuid.uuid4().hex
    out = tmp_path / "job.out"
    job = _sbatch("-J", "harness-test", "-n1", "-c1", "--mem=100M", "-t", "1", "-o", str(out),
                  "--wrap", f"echo hello-{token}")
    state = _wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"))
    assert state == "COMPLETED"
    assert out.read_text().strip() == f"hello-{token}"


def test_cancelled_job_is_recorded(tmp_path: Path):
    """What submitit relies on: a job that dies without output still shows as ended in sacct."""
    _need_cluster()
    job = _sbatch("-J", "harness-test-cancel", "-n1", "-c1", "--mem=100M", "-t", "2",
                  "-o", str(tmp_path / "cancel.out"), "--wrap", "sleep 120")
    subprocess.run(["scancel", job], check=True, timeout=30)
    assert _wait_state(job, ("CANCELLED", "COMPLETED", "FAILED")) == "CANCELLED"
