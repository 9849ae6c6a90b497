"""`harness sweep` and `harness status`: a sweep's runs as submitit jobs, and where each one stands.

Layout under the results root (default results/):

    <sweep>/sweep_state.json      job id, launcher, attempts and last failure of every run (atomic)
    <sweep>/.sweep.lock           held (flock) by the `harness sweep` dispatching this sweep
    <sweep>/jobs/<job id>/        submitit's pickles and stdout/stderr of each job
    <sweep>/runs/<run_id>/        run.json, train.jsonl, eval.jsonl, checkpoints/, samples/, logs/
                                  (logs/ links to the run's submitit folders and holds job.log)

Launchers: `slurm` submits all runs that need work as one job array (submitit's batch), with
`tasks_per_node = gpus_per_node` for DDP (the trainer reads submitit's distributed environment);
`local` runs them as local processes, at most `launcher.max_concurrent_local` at a time; `debug`
runs them one after the other in this process. Jobs are checkpointable: on preemption or time limit
submitit requeues the same call, and `scontrol requeue` restarts it too; the trainer then resumes
from the newest valid checkpoint.

A rerun is safe: runs whose `done` file exists and whose eval records are complete are skipped;
Slurm jobs still pending or running are waited for, not resubmitted; failed, cancelled and
interrupted runs are resubmitted and resume from their checkpoints. Within a job, rank 0 holds an
flock on runs/<run_id>/.run.lock while training, so an orphaned process of a killed sweep and its
replacement never train the same run at once.

`checkpoints_from: SRC` sweeps train nothing: each job hard-links (or copies) the checkpoints at
eval.at_steps of results/SRC/runs/<run_id>/ into its own run folder and evaluates them (train.steps
is lowered to max(eval.at_steps), which the run id ignores, so the trainer never trains past them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from harness.errors import HarnessError
from harness.evaluation import eval_progress
from harness.io import atomic_write_json, read_jsonl
from harness.spec import RunSpec, SweepSpec, expand_path, load_spec

log = logging.getLogger(__name__)

STATE_FILE = "sweep_state.json"
LOCK_FILE = ".sweep.lock"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "UNKNOWN"}
POLL_S = float(os.environ.get("HARNESS_POLL_S", "5"))


# --------------------------------------------------------------------------- paths and state
def sweep_dir(spec: SweepSpec, results: str | Path) -> Path:
    return Path(results) / spec.name


def run_dir(spec: SweepSpec, results: str | Path, run: RunSpec) -> Path:
    return sweep_dir(spec, results) / "runs" / run.run_id


def load_state(sdir: Path) -> dict:
    path = sdir / STATE_FILE
    if not path.exists():
        return {"runs": {}}
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise HarnessError(f"{path}: unreadable sweep state ({err}). Fix: move it aside; the next "
                           "`harness sweep` rebuilds it from the run folders (finished runs are kept).")


def save_state(sdir: Path, state: dict) -> None:
    atomic_write_json(sdir / STATE_FILE, state)


@contextlib.contextmanager
def sweep_lock(sdir: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking flock on <sweep>/.sweep.lock; HarnessError if taken."""
    sdir.mkdir(parents=True, exist_ok=True)
    path = sdir / LOCK_FILE
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise HarnessError(f"{path}: this sweep is being dispatched by {holder}. Fix: wait for it to finish "
                               f"(or stop it); `harness status` shows progress meanwhile.")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the flock


# --------------------------------------------------------------------------- run progress on disk
def train_progress(rdir: Path) -> int:
    """The last step recorded in train.jsonl, or the newest checkpoint's step, or 0."""
    last = 0
    for rec in read_jsonl(rdir / "train.jsonl"):
        last = max(last, int(rec.get("step", 0)))
    ckpts = sorted(int(p.name[5:12]) for p in (rdir / "checkpoints").glob("step_*.pt")
                   if p.name[5:12].isdigit()) if (rdir / "checkpoints").is_dir() else []
    return max([last] + ckpts)


def is_complete(run: RunSpec, rdir: Path) -> bool:
    done, want = eval_progress(run, rdir)
    return (rdir / "done").exists() and done >= want


# --------------------------------------------------------------------------- the job
def _global_rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "SUBMITIT_GLOBAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    try:
        import submitit

        return submitit.JobEnvironment().global_rank
    except Exception:  # noqa: BLE001 - not in a submitit job
        return 0


def stage_checkpoints(run: RunSpec, source_dir: Path, rdir: Path) -> None:
    """Link (or copy) the source run's checkpoints at eval.at_steps, with their checksum files."""
    from harness.checkpoint import checkpoint_path

    dst_dir = rdir / "checkpoints"
    dst_dir.mkdir(parents=True, exist_ok=True)
    for step in run.eval.at_steps:
        src = checkpoint_path(source_dir / "checkpoints", step)
        if not src.exists():
            raise HarnessError(
                f"{src}: missing, but sweep {run.sweep!r} (checkpoints_from: {run.checkpoints_from}) evaluates "
                f"step {step} of run {run.run_id}. Fix: finish that sweep first (harness sweep "
                f"sweeps/{run.checkpoints_from}.yaml), or evaluate steps it kept (eval.at_steps).")
        for s, d in ((src, checkpoint_path(dst_dir, step)),
                     (src.with_name(src.name + ".sha256"), checkpoint_path(dst_dir, step).with_name(
                         checkpoint_path(dst_dir, step).name + ".sha256"))):
            if d.exists() or not s.exists():
                continue
            tmp = d.with_name(f".{d.name}.stage.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(s, tmp)
            except OSError:
                shutil.copy2(s, tmp)
            os.replace(tmp, d)


class SweepJob:
    """submitit callable for one run: `SweepJob(cpus)(run_dict, run_dir, source_dir)`.

    Checkpointable: on preemption or timeout submitit calls `checkpoint`, which requeues the same
    call; the trainer resumes from the newest valid checkpoint. On a CPU the job uses
    `cpus_per_task` torch threads, so concurrent local jobs do not oversubscribe the cores.
    """

    def __init__(self, cpus_per_task: int | None = None):
        self.cpus_per_task = cpus_per_task

    def __call__(self, run: dict, rdir: str, source_dir: str | None = None) -> str:
        import torch

        from harness.train import run_training

        if self.cpus_per_task and not torch.cuda.is_available():
            torch.set_num_threads(self.cpus_per_task)

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        path = Path(rdir)
        spec = RunSpec.from_dict(run)
        handler = None
        rank = _global_rank()
        if rank == 0:
            (path / "logs").mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path / "logs" / "job.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger().addHandler(handler)
        try:
            if spec.checkpoints_from:
                if rank == 0:
                    stage_checkpoints(spec, Path(source_dir), path)
                # evaluate only: never train past the staged checkpoints (steps is not in the id)
                spec.train = dataclasses.replace(spec.train, steps=max(spec.eval.at_steps))
            run_training(spec, path)  # holds the run folder's lock while it trains
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()
        return str(path)

    def checkpoint(self, run: dict, rdir: str, source_dir: str | None = None) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(SweepJob(self.cpus_per_task), run, rdir, source_dir)


# --------------------------------------------------------------------------- executors
def make_executor(kind: str, spec: SweepSpec, folder: Path) -> Any:
    import submitit

    L = spec.launcher
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster=kind)
    tasks = max(1, L.gpus_per_node)
    params: dict[str, Any] = {"name": f"dit-{spec.name}", "timeout_min": L.timeout_min}
    if kind == "slurm":
        params.update(nodes=L.nodes, tasks_per_node=tasks, cpus_per_task=L.cpus_per_task, mem_gb=L.mem_gb,
                      slurm_array_parallelism=L.array_parallelism)
        if L.gpus_per_node:
            params["gpus_per_node"] = L.gpus_per_node
        for key in ("partition", "account", "qos"):
            if getattr(L, key):
                params[f"slurm_{key}"] = getattr(L, key)
        if L.additional:
            params["slurm_additional_parameters"] = dict(L.additional)
    elif kind == "local":
        params.update(tasks_per_node=tasks, gpus_per_node=L.gpus_per_node)
    ex.update_parameters(**params)
    return ex


def _job_error(job: Any) -> str | None:
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
    return lines[-1].strip() if lines else "error"


def _job_reason(job: Any, state: str) -> str:
    """A one-line failure reason: the scheduler state and the last line of the job's error."""
    detail = _job_error(job)
    return f"{state}: {detail}" if detail else state


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: Slurm state} straight from sacct (submitit's watcher polls at most once a minute).
    Array tasks not yet started show in sacct as "ID_[0-3]"; they are reported PENDING."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    try:
        proc = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("sacct failed: %s", err)
        return {}
    seen: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        jid, _, st = line.partition("|")
        if jid.strip():
            seen[jid.strip()] = (st.split() or ["UNKNOWN"])[0]
    out = {}
    for j in ids:
        if j in seen:
            out[j] = seen[j]
        elif "_" in j and any(k.startswith(j.split("_")[0] + "_[") for k in seen):
            out[j] = "PENDING"
        else:
            out[j] = "UNKNOWN"
    return out


def _slurm_job(state_entry: dict) -> Any:
    import submitit

    return submitit.SlurmJob(folder=state_entry["job_folder"], job_id=state_entry["job_id"])


def _link_logs(rdir: Path, job: Any) -> None:
    logs = rdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    target = Path(job.paths.folder)
    link = logs / f"job-{job.job_id}"
    if not link.exists() and not link.is_symlink():
        with contextlib.suppress(OSError):
            link.symlink_to(os.path.relpath(target, logs))


# --------------------------------------------------------------------------- status
@dataclasses.dataclass
class RunStatus:
    run: RunSpec
    dir: Path
    state: str            # done | pending | running | failed | interrupted | new
    step: int
    evals: tuple[int, int]
    job_id: str | None
    reason: str | None


def run_statuses(spec: SweepSpec, results: str | Path, query_scheduler: bool = True) -> list[RunStatus]:
    """Each run's state from its folder, the sweep state file and (Slurm) sacct."""
    sdir = sweep_dir(spec, results)
    state = load_state(sdir)
    out = []
    slurm_ids = [e.get("job_id") for e in state["runs"].values() if e.get("launcher") == "slurm"]
    sched_states = sacct_states(slurm_ids) if query_scheduler else {}
    for run in spec.expand():
        rdir = run_dir(spec, results, run)
        entry = state["runs"].get(run.run_id, {})
        evals = eval_progress(run, rdir)
        step = train_progress(rdir)
        job_id, reason = entry.get("job_id"), entry.get("reason")
        if is_complete(run, rdir):
            st, reason = "done", None
        elif entry.get("launcher") == "slurm" and job_id and query_scheduler:
            sched = sched_states.get(job_id, "UNKNOWN")
            if sched in ACTIVE_STATES and sched != "UNKNOWN":
                st, reason = ("pending" if sched in ("PENDING", "REQUEUED", "REQUEUE_HOLD") else "running"), None
            elif sched == "UNKNOWN" and time.time() - entry.get("submitted", 0) < 60:
                st, reason = "pending", None  # not yet in sacct
            else:
                st = "failed"
                reason = reason or _job_reason(_slurm_job(entry), sched)
        elif reason:
            st = "failed"
        elif step > 0 or evals[0] > 0:
            st = "interrupted"
        else:
            st = "new"
        out.append(RunStatus(run, rdir, st, step, evals, job_id, reason))
    return out


def format_status(spec: SweepSpec, statuses: list[RunStatus]) -> str:
    rows = [["run_id", "state", "step", "evals", "job", "reason"]]
    for s in statuses:
        steps = s.run.train.steps if not s.run.checkpoints_from else max(s.run.eval.at_steps)
        rows.append([s.run.run_id, s.state, f"{s.step}/{steps}", f"{s.evals[0]}/{s.evals[1]}",
                     s.job_id or "-", (s.reason or "").replace(str(s.dir), "run")[:160]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append(f"sweep {spec.name}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(lines)


# --------------------------------------------------------------------------- dispatch
def _check_runnable(spec: SweepSpec, results: Path) -> None:
    """What validation cannot know until dispatch: environment variables and source checkpoints."""
    d = spec.data
    if d.dataset == "imagefolder" and spec.train.steps > 0:  # steps 0: evaluate train.init_from only
        path = Path(expand_path(d.path, "data.path"))
        if not path.is_dir():
            raise HarnessError(f"{spec.path}: data.path {path} is not a folder. Fix: point it (or the variable "
                               "it names) at the ImageNet train folder, root/<class>/<image>.")
    expand_path(d.autoencoder_path, "data.autoencoder_path")
    expand_path(spec.eval.reference, "eval.reference")
    expand_path(spec.eval.inception_weights, "eval.inception_weights")
    if spec.checkpoints_from and not (results / spec.checkpoints_from / "runs").is_dir():
        raise HarnessError(f"{spec.path}: checkpoints_from: no results of sweep {spec.checkpoints_from!r} under "
                           f"{results}. Fix: run `harness sweep sweeps/{spec.checkpoints_from}.yaml` first, or pass "
                           "--results where they live.")


def _write_run_json(run: RunSpec, rdir: Path) -> float:
    """Write run.json (the run, its shape, Gflops and params); return its planned compute in Gflops."""
    from harness.plan import plan_run

    p = plan_run(run)
    record = run.to_dict()
    record.update(run.shape.to_dict())
    record.pop("name", None)
    record.update(gflops=p.gflops, params=p.params, input_size=p.input_size, in_channels=p.in_channels)
    atomic_write_json(rdir / "run.json", record)
    return p.train_gflops + p.sampling_gflops


def dispatch(spec: SweepSpec, results: str | Path = "results", launcher: str | None = None,
             wait: bool = True) -> list[RunStatus]:
    """Submit every run of `spec` that needs work; wait (unless `wait` is False); return statuses."""
    results = Path(results)
    kind = launcher or spec.launcher.kind
    if kind == "slurm" and shutil.which("sbatch") is None:
        raise HarnessError(f"{spec.path}: launcher.kind is slurm but `sbatch` is not on PATH. Fix: run on a "
                           "Slurm login node, start a local cluster (sudo scripts/local-slurm.sh), or pass "
                           "--launcher local.")
    _check_runnable(spec, results)
    sdir = sweep_dir(spec, results)
    with sweep_lock(sdir):
        state = load_state(sdir)
        state.update(sweep=spec.name, spec=str(spec.path))
        statuses = run_statuses(spec, results)
        todo = [s for s in statuses if s.state in ("new", "interrupted", "failed")]
        active = [s for s in statuses if s.state in ("pending", "running")]
        log.info("sweep %s: %d runs, %d done, %d already queued or running, %d to submit", spec.name,
                 len(statuses), sum(s.state == "done" for s in statuses), len(active), len(todo))
        costs = {}
        for s in todo:
            s.dir.mkdir(parents=True, exist_ok=True)
            costs[s.run.run_id] = _write_run_json(s.run, s.dir)
        # costliest first: with a few local workers the longest run no longer starts last and runs alone
        todo.sort(key=lambda s: -costs[s.run.run_id])
        args = [(s.run.to_dict(), str(s.dir),
                 str(results / spec.checkpoints_from / "runs" / s.run.run_id) if spec.checkpoints_from else None)
                for s in todo]
        ex = make_executor(kind, spec, sdir / "jobs")
        jobs: dict[str, Any] = {}

        def record(s: RunStatus, job: Any) -> None:
            entry = state["runs"].setdefault(s.run.run_id, {})
            entry.update(launcher=kind, job_id=str(job.job_id), job_folder=str(sdir / "jobs" / "%j"),
                         submitted=time.time(), attempts=entry.get("attempts", 0) + 1, reason=None)
            _link_logs(s.dir, job)
            jobs[s.run.run_id] = job

        try:
            if kind == "slurm":
                if todo:
                    with ex.batch():
                        submitted = [ex.submit(SweepJob(spec.launcher.cpus_per_task), *a) for a in args]
                    for s, job in zip(todo, submitted):
                        record(s, job)
                    save_state(sdir, state)
                    log.info("submitted job array %s (%d runs)", submitted[0].job_id.split("_")[0], len(submitted))
                for s in active:
                    jobs[s.run.run_id] = _slurm_job(state["runs"][s.run.run_id])
                if wait:
                    _wait_slurm(spec, jobs, state, sdir)
            elif kind == "local":
                _run_local(ex, spec, todo, args, record, state, sdir, spec.launcher.max_concurrent_local)
            else:
                for s, a in zip(todo, args):
                    job = ex.submit(SweepJob(spec.launcher.cpus_per_task), *a)
                    record(s, job)
                    save_state(sdir, state)
                    _finish(s.run.run_id, job, state, "FAILED", debug=True)
                    save_state(sdir, state)
        finally:
            save_state(sdir, state)
        return run_statuses(spec, results, query_scheduler=(kind == "slurm"))


def _finish(run_id: str, job: Any, state: dict, sched: str, debug: bool = False) -> None:
    """Record how a finished job ended (a reason if it raised or was killed). `debug`: run the
    in-process job through `exception()`, since submitit's DebugJob.result() opens pdb on errors."""
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
        detail = (None if debug else _job_error(job)) or (lines[-1].strip() if lines else type(err).__name__)
        if "has not produced any output" in detail or not detail:
            detail = ""
        entry["reason"] = f"{sched}: {detail}" if detail else sched
        log.warning("run %s failed: %s", run_id, entry["reason"])


def _wait_slurm(spec: SweepSpec, jobs: dict[str, Any], state: dict, sdir: Path) -> None:
    last: dict[str, str] = {}
    pending = dict(jobs)
    while pending:
        now = sacct_states([job.job_id for job in pending.values()])
        for run_id, job in list(pending.items()):
            sched = now.get(job.job_id, "UNKNOWN")
            if sched != last.get(run_id):
                log.info("%s: job %s %s", run_id, job.job_id, sched)
                last[run_id] = sched
            if sched in ACTIVE_STATES:
                if sched == "UNKNOWN" and time.time() - state["runs"][run_id].get("submitted", 0) > 600:
                    pass  # sacct never heard of it: treat as ended below
                else:
                    continue
            error = _job_error(job)
            if sched == "COMPLETED" and error is None:
                state["runs"][run_id]["reason"] = None
            else:
                state["runs"][run_id]["reason"] = _job_reason(job, sched)
                log.warning("run %s failed: %s", run_id, state["runs"][run_id]["reason"])
            del pending[run_id]
            save_state(sdir, state)
        if pending:
            time.sleep(POLL_S)


class SweepStopped(SystemExit):
    """SIGTERM/SIGHUP reached `harness sweep` (`kill PID`, a closed terminal): stop like Ctrl-C."""


@contextlib.contextmanager
def _stop_on_term() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception while local jobs run, so their cleanup (stopping
    the child jobs, recording why) runs; Python's default would exit without it and leave orphans."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise SweepStopped(128 + signum)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started in the background (`nohup ... &`): the local jobs would inherit an ignored SIGINT,
        # and submitit cancels a local job with SIGINT -- they would keep training after we stop
        old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _run_local(ex: Any, spec: SweepSpec, todo: list[RunStatus], args: list[tuple], record: Any,
               state: dict, sdir: Path, max_concurrent: int) -> None:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    queue = list(zip(todo, args))
    running: dict[str, Any] = {}
    # a progress bar over the training steps of this dispatch (shown on a terminal only)
    with _stop_on_term(), logging_redirect_tqdm(), tqdm(total=sum(s.run.train.steps for s in todo), unit="step",
                                                        desc=f"sweep {spec.name}", disable=None) as bar:
        def progress() -> None:
            bar.n = sum(min(train_progress(s.dir), s.run.train.steps) for s in todo)
            bar.set_postfix_str(f"{sum((s.dir / 'done').exists() for s in todo)}/{len(todo)} runs done")

        _run_local_loop(ex, spec, queue, running, record, state, sdir, max_concurrent, progress)
        progress()


def _run_local_loop(ex: Any, spec: SweepSpec, queue: list, running: dict[str, Any], record: Any,
                    state: dict, sdir: Path, max_concurrent: int, progress: Any = lambda: None) -> None:
    try:
        while queue or running:
            progress()
            while queue and len(running) < max_concurrent:
                s, a = queue.pop(0)
                job = ex.submit(SweepJob(spec.launcher.cpus_per_task), *a)
                record(s, job)
                save_state(sdir, state)
                running[s.run.run_id] = job
                log.info("%s: started local job %s", s.run.run_id, job.job_id)
            for run_id, job in list(running.items()):
                if job.done():
                    _finish(run_id, job, state, job.state)
                    del running[run_id]
                    save_state(sdir, state)
            if running:
                time.sleep(min(POLL_S, 1.0))
    except BaseException:
        for run_id, job in running.items():  # interrupted: stop our children; checkpoints stay
            with contextlib.suppress(Exception):
                job.cancel(check=False)
            state["runs"][run_id]["reason"] = "interrupted: harness sweep was stopped"
        deadline = time.monotonic() + 15  # submitit's controller SIGKILLs a task 1 s after SIGINT
        for job in running.values():
            with contextlib.suppress(Exception):
                while not job.done() and time.monotonic() < deadline:
                    time.sleep(0.1)
        raise


# --------------------------------------------------------------------------- CLI
def _results_root(args: Any) -> Path:
    return Path(getattr(args, "results", None) or "results")


def cli_sweep(args: Any) -> int:
    spec = load_spec(args.sweep)
    statuses = dispatch(spec, _results_root(args), args.launcher, wait=not getattr(args, "no_wait", False))
    print(format_status(spec, statuses))
    if getattr(args, "no_wait", False):
        return 0
    failed = [s for s in statuses if s.state != "done"]
    if failed:
        print(f"{len(failed)} run(s) not done; fix the reasons above and run the same command again "
              "(finished runs are kept, unfinished ones resume from their checkpoints)")
        return 1
    if not getattr(args, "no_report", False):
        try:
            from harness.cli import main as cli_main
        except ImportError:  # pragma: no cover
            return 0
        return cli_main(["report", str(spec.path), "--results", str(_results_root(args)),
                         "--out", str(getattr(args, "reports", None) or "reports")])
    return 0


def cli_status(args: Any) -> int:
    spec = load_spec(args.sweep)
    print(format_status(spec, run_statuses(spec, _results_root(args))))
    return 0
