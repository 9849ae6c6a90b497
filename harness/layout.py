"""The results folder contract: every path and file name under results/<sweep>/, in one place.

    <results>/<sweep>/sweep_state.json      job id, launcher, attempts and last failure of every run (atomic)
    <results>/<sweep>/.sweep.lock           held (flock) by the `harness sweep` dispatching this sweep
    <results>/<sweep>/jobs/<job id>/        submitit's pickles and stdout/stderr of each job
    <results>/<sweep>/runs/<run_id>/        one run's folder (see `RunFolder`)

Writers and readers (dispatch, the trainer, status, results, the report) ask this module for the
names; none of them spells a file name itself.
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.errors import HarnessError
from harness.io import atomic_write_json

STATE_FILE = "sweep_state.json"
LOCK_FILE = ".sweep.lock"
JOBS_DIR = "jobs"
RUNS_DIR = "runs"


def sweep_dir(results: str | Path, sweep: str) -> Path:
    """results/<sweep>/."""
    return Path(results) / sweep


def run_dir(results: str | Path, sweep: str, run_id: str) -> Path:
    """results/<sweep>/runs/<run_id>/."""
    return sweep_dir(results, sweep) / RUNS_DIR / run_id


def load_state(sdir: Path) -> dict:
    """The sweep state {"runs": {run_id: {launcher, job_id, job_folder, submitted, attempts, reason}}}."""
    path = Path(sdir) / STATE_FILE
    if not path.exists():
        return {"runs": {}}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise HarnessError(f"{path}: unreadable sweep state ({err}). Fix: move it aside; the next "
                           "`harness sweep` rebuilds it from the run folders (finished runs are kept).")


def save_state(sdir: Path, state: dict) -> None:
    atomic_write_json(Path(sdir) / STATE_FILE, state)
