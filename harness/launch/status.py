"""`harness status`: where each run of a sweep stands, from its folder, the sweep state, squeue and sacct.

A run is `done` (its `done` file exists and its eval records are complete), `pending` or `running`
(its Slurm job is queued or active), `failed` (with the reason: the scheduler state and the last
line of the job's error), `interrupted` (some progress, no job), `damaged` (what `harness.launch.repair`
finds: a bad run.json, a checkpoint without its sidecar; the next `harness sweep` repairs it) or `new`.
"""
from __future__ import annotations

import dataclasses
import getpass
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from harness.config import layout
from harness.config.arguments import add_spec_arguments
from harness.training.evaluation import eval_progress
from harness.io import read_jsonl
from harness.launch.repair import damage
from harness.config.spec import RunSpec, SweepSpec, load_spec

log = logging.getLogger(__name__)

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "UNKNOWN"}
#: a job neither the controller nor sacct knows: an array task cancelled before it started
GONE = "GONE"
#: seconds between polls of sacct (Slurm) and of local jobs
POLL_S = float(os.environ.get("HARNESS_POLL_S", "5"))


# --------------------------------------------------------------------------- run progress on disk
@dataclasses.dataclass
class Progress:
    """What a run's records say of its pace: latest FID, training wall time, speed."""
    fid: float | None = None
    fid_step: int | None = None
    elapsed_s: float = 0.0            # training wall time, summed over every attempt (resumes included)
    images_per_s: float | None = None  # at the last logged step
    steps_per_s: float | None = None
    step: int = 0                     # the last step train.jsonl records


def run_progress(rdir: Path) -> Progress:
    """Progress from train.jsonl and eval.jsonl; each attempt's wall_s restarts at 0, so attempts are summed."""
    folder = layout.RunFolder(rdir)
    out, last_wall = Progress(), 0.0
    for rec in read_jsonl(folder.train_log):
        wall = float(rec.get("wall_s") or 0.0)
        if wall < last_wall:  # a new attempt: the previous one ran for last_wall seconds
            out.elapsed_s += last_wall
        last_wall = wall
        out.images_per_s, out.steps_per_s = rec.get("images_per_s"), rec.get("steps_per_s")
        out.step = max(out.step, int(rec.get("step", 0)))
    out.elapsed_s += last_wall
    for rec in read_jsonl(folder.eval_log):
        if rec.get("fid") is not None:
            out.fid, out.fid_step = float(rec["fid"]), int(rec.get("step", 0))
    return out


def train_progress(rdir: Path, progress: Progress | None = None) -> int:
    """The last step recorded in train.jsonl (`progress`'s, when the caller has read it already), or
    the newest checkpoint's step, or 0."""
    last = (progress or run_progress(rdir)).step
    return max([last] + layout.RunFolder(rdir).checkpoint_steps())


def is_complete(run: RunSpec, rdir: Path) -> bool:
    done, want = eval_progress(run, rdir)
    return layout.RunFolder(rdir).done.exists() and done >= want


# --------------------------------------------------------------------------- how a job ended
def job_error(job: Any) -> str | None:
    """The last line of the traceback a submitit job recorded, or None (no result, or success)."""
    from submitit.core.utils import pickle_load

    path = Path(job.paths.result_pickle)
    if not path.exists():
        return None
    try:
        outcome, payload = pickle_load(path)
    except Exception:  # noqa: BLE001 - a torn or foreign result file says nothing useful
        return None
    if outcome != "error":
        return None
    lines = [x for x in str(payload).strip().splitlines() if x.strip()]
    # "harness.io.WriteError: FILE: ... Fix: ..." -> the harness's own one line, without the class
    return re.sub(r"^harness(\.\w+)+Error: ", "", lines[-1].strip()) if lines else "error"


def job_reason(job: Any, state: str) -> str:
    """A one-line failure reason: the scheduler state and the last line of the job's error, or
    (Slurm, no error recorded) how the job's processes ended: "killed by signal 9 (SIGKILL)"."""
    if state == GONE:
        return (f"CANCELLED while pending: job {getattr(job, 'job_id', '?')} left Slurm's queue before it "
                "started, and sacct has no record of it")
    detail = job_error(job)
    if detail is None and state != "CANCELLED" and getattr(job, "job_id", None):
        detail = slurm_exit(job.job_id)
    return f"{state}: {detail}" if detail else state


def slurm_exit(job_id: str) -> str | None:
    """How a Slurm job's processes ended, from sacct's ExitCode fields ("code:signal"; the job's
    DerivedExitCode and each step's ExitCode): "killed by signal 9 (SIGKILL)", "exit code 1" or None.
    A task killed under srun shows as the job's ExitCode "9:0" (srun exits with the signal number)
    and the step's "0:9"; the signal field is the one to trust."""
    out = _query(["sacct", "-n", "-P", "-o", "JobID,ExitCode,DerivedExitCode", "-j", job_id]) or ""
    signals, codes = [], []
    for line in out.splitlines():
        for field in line.split("|")[1:]:
            code, _, sig = field.partition(":")
            if sig.strip().isdigit() and int(sig):
                signals.append(int(sig))
            elif code.strip().isdigit() and int(code):
                codes.append(int(code))
    if signals:
        try:
            name = signal.Signals(signals[0]).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {signals[0]} ({name})"
    return f"exit code {codes[0]}" if codes else None


def record_outcome(run_id: str, job: Any, state: dict, sched: str, debug: bool = False) -> None:
    """Record in the sweep state how a finished job ended (a reason if it raised or was killed).
    `debug`: run the in-process job through `exception()`, since submitit's DebugJob.result()
    opens pdb on errors."""
    entry = state["runs"][run_id]
    try:
        if debug:
            err = job.exception()
            if err is not None:
                raise err
        else:
            job.result()
        entry["reason"] = None
    except Exception as err:  # noqa: BLE001 - any failure of the job is recorded, not raised
        # submitit's FailedJobError ends with the log paths: the job's own error is in its result pickle
        lines = [x for x in str(err).strip().splitlines() if x.strip()]
        detail = (None if debug else job_error(job)) or (lines[-1].strip() if lines else type(err).__name__)
        if "has not produced any output" in detail or not detail:
            detail = ""
        entry["reason"] = f"{sched}: {detail}" if detail else sched
        log.warning("run %s failed: %s", run_id, entry["reason"])


def _query(cmd: list[str]) -> str | None:
    """stdout of a Slurm command, or None (with a warning) if it is absent, hangs or fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("%s failed: %s", cmd[0], err)
        return None
    if proc.returncode != 0:
        log.warning("%s failed: %s", cmd[0], proc.stderr.strip()[:300])
        return None
    return proc.stdout


def _states(text: str) -> dict[str, str]:
    """{job id: state} from "ID|STATE" lines ("CANCELLED by 0" -> "CANCELLED")."""
    out = {}
    for line in text.splitlines():
        jid, _, st = line.partition("|")
        if jid.strip():
            out[jid.strip()] = (st.split() or ["UNKNOWN"])[0]
    return out


def _array_record(job_id: str, records: dict[str, str]) -> str | None:
    """The state of array task "A_T" from sacct's one record "A_[0,2-5%2]" of A's unstarted tasks."""
    array, _, task = job_id.partition("_")
    if not task.isdigit():
        return None
    for key, st in records.items():
        if key.startswith(array + "_[") and key.endswith("]"):
            for part in key[len(array) + 2:-1].split("%")[0].split(","):
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= int(task) <= int(hi if hi.isdigit() else lo):
                    return st
    return None


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: Slurm state} from the controller (squeue, which knows every job it holds, finished
    ones for MinJobAge) and sacct (submitit's watcher polls at most once a minute). An array task
    that neither knows is GONE: cancelled while pending (Slurm drops it from the array and records
    nothing). If squeue cannot be asked, a job sacct does not know is UNKNOWN."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    accounted = _query(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)])
    queued = _query(["squeue", "-h", "-r", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T"])
    acct, queue = _states(accounted or ""), _states(queued or "")
    out = {}
    for j in ids:
        st = queue.get(j) or acct.get(j) or _array_record(j, acct)
        out[j] = st or (GONE if accounted is not None and queued is not None else "UNKNOWN")
    return out


def slurm_job(state_entry: dict) -> Any:
    """The submitit handle of a run's Slurm job, from its sweep-state entry."""
    import submitit

    return submitit.SlurmJob(folder=state_entry["job_folder"], job_id=state_entry["job_id"])


# --------------------------------------------------------------------------- status
@dataclasses.dataclass
class RunStatus:
    run: RunSpec
    dir: Path
    state: str            # done | pending | running | failed | interrupted | damaged | new
    step: int
    evals: tuple[int, int]
    job_id: str | None
    reason: str | None
    gpus: int | None = None  # the GPUs its Slurm job asked for (harness.cost.schedule), when sized
    progress: Progress | None = None  # what its train.jsonl and eval.jsonl say (read once, by run_statuses)


def _slurm_state(entry: dict, sched: str) -> tuple[str, str | None]:
    """(state, reason) of a run whose Slurm job sacct reports as `sched`."""
    if sched in ACTIVE_STATES and sched != "UNKNOWN":
        return ("pending" if sched in ("PENDING", "REQUEUED", "REQUEUE_HOLD") else "running"), None
    if sched == "UNKNOWN" and time.time() - entry.get("submitted", 0) < 60:
        return "pending", None  # not yet in sacct
    return "failed", entry.get("reason") or job_reason(slurm_job(entry), sched)


def run_statuses(spec: SweepSpec, results: str | Path, query_scheduler: bool = True) -> list[RunStatus]:
    """Each run's state from its folder, the sweep state file and (Slurm) sacct."""
    state = layout.load_state(layout.sweep_dir(results, spec.name))
    out = []
    slurm_ids = [e.get("job_id") for e in state["runs"].values() if e.get("launcher") == "slurm"]
    sched_states = sacct_states(slurm_ids) if query_scheduler else {}
    for run in spec.expand():
        rdir = layout.run_dir(results, spec.name, run.run_id)
        entry = state["runs"].get(run.run_id, {})
        evals = eval_progress(run, rdir)
        progress = run_progress(rdir)
        step = train_progress(rdir, progress)
        job_id, reason = entry.get("job_id"), entry.get("reason")
        damaged = damage(run, rdir) if rdir.is_dir() else None
        if is_complete(run, rdir):
            st, reason = ("damaged", damaged) if damaged else ("done", None)
        elif entry.get("launcher") == "slurm" and job_id and query_scheduler:
            st, reason = _slurm_state(entry, sched_states.get(job_id, "UNKNOWN"))
        elif damaged:
            st, reason = "damaged", damaged
        elif reason:
            st = "failed"
        elif step > 0 or evals[0] > 0:
            st = "interrupted"
        else:
            st = "new"
        out.append(RunStatus(run, rdir, st, step, evals, job_id, reason, entry.get("gpus"), progress))
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes = seconds / 60
    return f"{seconds:.0f}s" if seconds < 90 else f"{minutes:.0f}m" if minutes < 90 else f"{minutes / 60:.1f}h"


def format_status(spec: SweepSpec, statuses: list[RunStatus]) -> str:
    """A table: state, the GPUs its job asked for, step, evaluations, latest FID, training wall time, images/s, a training ETA (remaining
    steps at the last logged speed; evaluations not included), job and reason; then counts per state."""
    rows = [["run_id", "state", "gpus", "step", "evals", "fid", "elapsed", "img/s", "eta", "job", "reason"]]
    for s in statuses:
        steps = s.run.train.steps if not s.run.checkpoints_from else max(s.run.eval.at_steps)
        p = s.progress or run_progress(s.dir)
        active = p.steps_per_s and steps > s.step and s.state not in ("done", "failed")
        eta = (steps - s.step) / p.steps_per_s if active else None
        rows.append([s.run.run_id, s.state, str(s.gpus or "-"), f"{s.step}/{steps}", f"{s.evals[0]}/{s.evals[1]}",
                     f"{p.fid:.2f}@{p.fid_step}" if p.fid is not None else "-",
                     _duration(p.elapsed_s) if p.elapsed_s else "-",
                     f"{p.images_per_s:,.0f}" if p.images_per_s else "-", _duration(eta),
                     s.job_id or "-", (s.reason or "").replace(str(s.dir), "run")[:160]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append(f"sweep {spec.name}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(lines)


def add_status_arguments(s) -> None:
    """`harness status`'s flags."""
    add_spec_arguments(s, help=None)
    s.add_argument("--results", default="results")


def cli_status(args: Any) -> int:
    spec = load_spec(args.sweep, args.overrides)
    print(format_status(spec, run_statuses(spec, args.results or "results")))
    return 0
