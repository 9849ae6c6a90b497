"""Helpers shared by the tests that use the local Slurm cluster (not a test module itself)."""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest


def need_slurm() -> None:
    """Skip the calling test unless a Slurm controller answers `sinfo` (scripts/local-slurm.sh)."""
    if shutil.which("sinfo") is None:
        pytest.skip("Slurm is not installed: `sinfo` is absent (start one with `sudo scripts/local-slurm.sh`)")
    if subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("no Slurm controller answers `sinfo`; start one with `sudo scripts/local-slurm.sh`")


def wait_until(predicate, timeout: float, what: str, poll_s: float = 0.1) -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds naming `what`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")
