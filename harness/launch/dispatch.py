"""`harness sweep`: submit a sweep's runs as submitit jobs and record them in the sweep state.

The files it writes under results/<sweep>/ are named by `harness.config.layout`. Launchers: `slurm`
submits all runs that need work as job arrays (submitit's batch) in the plan's order, longest first (one
array per stretch of runs with the same GPU count), with `launcher.tasks_per_node` ranks per node for DDP (default: one per GPU; the trainer reads submitit's distributed environment);
`local` runs them as local processes through `harness.launch.local_pool`; `debug` runs them one after the
other in this process. What runs inside each job is `harness.launch.job.SweepJob`; where each run stands
is `harness.launch.status`.

A rerun is safe: runs whose `done` file exists and whose eval records are complete are skipped;
Slurm jobs still pending or running are waited for, not resubmitted (and a local or debug dispatch
is refused while they are); failed, cancelled and interrupted runs, and array tasks cancelled while
pending, are resubmitted and resume from their checkpoints. Within a job, rank 0 holds an
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
import time
from pathlib import Path
from typing import Any, Iterator

from harness.config import layout
from harness.config.arguments import add_spec_arguments
from harness.errors import HarnessError
from harness.io import writing
from harness.launch.job import SweepJob
from harness.cost.plan import plan_sweep, record_run
from harness.cost.schedule import submission_order
from harness.data.latents import run_latent_stage
from harness.launch.preflight import require_ready, sbatch_fix
from harness.config.spec import LAUNCHERS, SweepSpec, load_spec
from harness.launch.status import (ACTIVE_STATES, POLL_S, RunStatus, format_status, job_error, job_reason,
                            record_outcome, run_statuses, sacct_states, slurm_job)
from harness.launch.local_pool import run_local
from harness.launch.repair import repair
from harness.report import report_sweep

log = logging.getLogger(__name__)


@contextlib.contextmanager
def sweep_lock(sdir: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking flock on <sweep>/.sweep.lock; HarnessError if taken."""
    path = sdir / layout.LOCK_FILE
    with writing(path):  # a read-only or vanished results folder: one line
        sdir.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise HarnessError(f"{path}: this sweep is being dispatched by {holder}. Fix: wait for it to finish "
                               f"(or stop it); `harness status` shows progress meanwhile.")
        with writing(path):
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            f.flush()
        yield
    finally:
        f.close()  # releases the flock


# --------------------------------------------------------------------------- executors
def make_executor(kind: str, spec: SweepSpec, folder: Path, gpus: int | None = None) -> Any:
    """A submitit executor for the spec's launcher; with `gpus`, for one run of that many GPUs (Slurm):
    whole nodes beyond one node's GPUs, else that share of a node (GPUs, one rank each, memory pro rata)."""
    import submitit

    L = spec.launcher
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster=kind)
    tasks, nodes, per_node, mem_gb = L.ranks_per_node, L.nodes, L.gpus_per_node, L.mem_gb
    if gpus is not None and L.gpus_per_node:
        per_node = min(gpus, L.gpus_per_node)
        nodes, tasks, mem_gb = max(1, gpus // L.gpus_per_node), per_node, L.mem_gb * per_node / L.gpus_per_node
    params: dict[str, Any] = {"name": f"dit-{spec.name}", "timeout_min": L.timeout_min}
    if kind == "slurm":
        params.update(nodes=nodes, tasks_per_node=tasks, cpus_per_task=L.cpus_per_task, mem_gb=mem_gb,
                      slurm_array_parallelism=L.array_parallelism)
        if per_node:
            params["gpus_per_node"] = per_node
        for key in ("partition", "account", "qos"):
            if getattr(L, key):
                params[f"slurm_{key}"] = getattr(L, key)
        if L.additional:
            params["slurm_additional_parameters"] = dict(L.additional)
    elif kind == "local":
        params.update(tasks_per_node=tasks, gpus_per_node=L.gpus_per_node)
    ex.update_parameters(**params)
    return ex


def _link_logs(rdir: Path, job: Any) -> None:
    logs = layout.RunFolder(rdir).logs
    logs.mkdir(parents=True, exist_ok=True)
    target = Path(job.paths.folder)
    link = logs / f"job-{job.job_id}"
    if not link.exists() and not link.is_symlink():
        with contextlib.suppress(OSError):
            link.symlink_to(os.path.relpath(target, logs))


@contextlib.contextmanager
def _held_stderr() -> Iterator[None]:
    """Hold what child processes (sbatch) write to stderr; replay it unless the block raised, so a
    refusal is reported once, in our one line, and not also as sbatch's raw lines."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        sys.stderr.write(held.read().decode(errors="replace"))


def run_gpus(spec: SweepSpec) -> dict[str, tuple[int, float]]:
    """{run_id: (GPUs, planned hours on them)} by harness.cost.schedule's rule, from the plan at the spec's gpu_kind;
    HarnessError (one line) for a run no GPU count can finish in time: refused before anything is submitted."""
    plan = plan_sweep(spec, gpu=spec.launcher.gpu_kind)
    return {r["run_id"]: (r["gpus"], r["end_h"] - r["start_h"]) for r in plan["runs"]}


def _sbatch_refusal(spec: SweepSpec, err: Exception, earlier: int = 0) -> HarnessError:
    """One line for a job array sbatch refused: the spec key to change and sbatch's own words."""
    said = [x.strip().removeprefix("sbatch: error: ") for x in str(err).splitlines() if "error" in x.lower()]
    said = said or [x.strip() for x in str(err).splitlines() if x.strip()][:1]
    key, how = sbatch_fix(" ".join(said))
    done = (f"The {earlier} run(s) of the arrays before it were submitted; run the same command again once fixed"
            if earlier else "Nothing was submitted")
    return HarnessError(f"{spec.path}: Slurm refused the job array (sbatch: {'; '.join(said)}). Fix: change "
                        f"{key} in the spec; {how}. {done}.")


# --------------------------------------------------------------------------- dispatch
def dispatch(spec: SweepSpec, results: str | Path = "results", launcher: str | None = None,
             wait: bool = True) -> list[RunStatus]:
    """Submit every run of `spec` that needs work; wait (unless `wait` is False); return statuses."""
    results = Path(results)
    kind = launcher or spec.launcher.kind
    require_ready(spec, results, kind)  # every input checked, all problems at once, before anything is written
    sized = run_gpus(spec) if kind == "slurm" and spec.launcher.gpus_per_node else {}
    sdir = layout.sweep_dir(results, spec.name)
    with sweep_lock(sdir):
        state = layout.load_state(sdir)
        statuses = run_statuses(spec, results)
        if kind != "slurm":
            _refuse_beside_slurm(spec, sdir, kind, statuses)
        state.update(sweep=spec.name, spec=str(spec.path))
        layout.write_sweep_record(sdir, [r.run_id for r in spec.expand()], spec.text or spec.path.read_text())
        statuses = _repaired(spec, results, statuses)
        todo = [s for s in statuses if s.state in ("new", "interrupted", "failed", "damaged")]
        active = [s for s in statuses if s.state in ("pending", "running")]
        log.info("sweep %s: %d runs, %d done, %d already queued or running, %d to submit", spec.name,
                 len(statuses), sum(s.state == "done" for s in statuses), len(active), len(todo))
        args = _prepare(spec, results, todo, sized)
        ledger = _Ledger(kind, sdir, state, sized)
        ex = make_executor(kind, spec, ledger.jobs_dir)
        try:
            latent_jobs = _latent_stage(spec, todo, kind, ex, ledger.jobs_dir)
            state["latent_jobs"] = latent_jobs or state.get("latent_jobs", [])
            if kind == "slurm":
                _submit_arrays(spec, ex, todo, args, latent_jobs, ledger)
                for s in active:
                    ledger.jobs[s.run.run_id] = slurm_job(state["runs"][s.run.run_id])
                if wait:
                    _wait_slurm(ledger.jobs, state, sdir)
            elif kind == "local":
                run_local(ex, spec, todo, args, ledger.record, state, sdir)
            else:
                _run_debug(spec, ex, todo, args, ledger)
        finally:
            layout.save_state(sdir, state)
        return run_statuses(spec, results, query_scheduler=(kind == "slurm"))


def _prepare(spec: SweepSpec, results: Path, todo: list[RunStatus], sized: dict[str, tuple[int, float]]
             ) -> list[tuple]:
    """Write each run's folder and run.json, sort `todo` longest first (planned hours on its GPUs when
    sized, else Gflops: the longest run never starts last) and return each run's SweepJob arguments."""
    costs = []
    for s in todo:
        s.dir.mkdir(parents=True, exist_ok=True)
        p = record_run(s.run, s.dir)
        costs.append(sized[s.run.run_id][1] if sized else p.train_gflops + p.sampling_gflops)
    todo[:] = [todo[i] for i in submission_order(costs)]
    return [(s.run.to_dict(), str(s.dir),
             str(layout.run_dir(results, spec.checkpoints_from, s.run.run_id)) if spec.checkpoints_from else None)
            for s in todo]


@dataclasses.dataclass
class _Ledger:
    """What a dispatch has submitted: each run's job, noted in the sweep state as it is submitted."""

    kind: str
    sdir: Path
    state: dict
    sized: dict[str, tuple[int, float]]
    jobs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def jobs_dir(self) -> Path:
        return self.sdir / layout.JOBS_DIR

    def record(self, s: RunStatus, job: Any) -> None:
        entry = self.state["runs"].setdefault(s.run.run_id, {})
        entry.update(launcher=self.kind, job_id=str(job.job_id), job_folder=str(self.jobs_dir / "%j"),
                     submitted=time.time(), attempts=entry.get("attempts", 0) + 1, reason=None,
                     gpus=self.sized[s.run.run_id][0] if self.sized else None)
        _link_logs(s.dir, job)
        self.jobs[s.run.run_id] = job


def _latent_stage(spec: SweepSpec, todo: list[RunStatus], kind: str, ex: Any, jobs_dir: Path) -> list[str]:
    """The latent stage first (Slurm: its own job, and the training jobs wait for it: afterok)."""
    from submitit.core.utils import FailedJobError

    try:
        with _held_stderr() if kind == "slurm" else contextlib.nullcontext():
            return run_latent_stage(spec, [s.run for s in todo], kind, ex, make_executor(kind, spec, jobs_dir))
    except FailedJobError as err:  # sbatch refuses the latent job as it would the array
        raise _sbatch_refusal(spec, err) from None


def _submit_arrays(spec: SweepSpec, ex: Any, todo: list[RunStatus], args: list[tuple], latent_jobs: list[str],
                   ledger: _Ledger) -> None:
    """The runs as Slurm job arrays in submission order (longest first), each after the latent jobs: one array
    per stretch of consecutive runs with the same GPU count (`array_groups`), so that Slurm's queue, ordered by
    job id at equal priority, holds the runs in the order the plan simulated."""
    from submitit.core.utils import FailedJobError

    counts = [ledger.sized[s.run.run_id][0] if ledger.sized else None for s in todo]
    for gpus, members in ((g, [(todo[i], args[i]) for i in idx]) for g, idx in array_groups(counts)):
        gex = ex if gpus is None else make_executor(ledger.kind, spec, ledger.jobs_dir, gpus)
        if gpus is not None and latent_jobs:
            gex.update_parameters(slurm_dependency="afterok:" + ":".join(latent_jobs))
        try:  # one sbatch per array: it is submitted whole or not at all
            with _held_stderr(), gex.batch():
                submitted = [gex.submit(SweepJob(spec.launcher.cpus_per_task), *a) for _, a in members]
        except FailedJobError as err:  # submitit carries sbatch's stderr
            raise _sbatch_refusal(spec, err, earlier=len(ledger.jobs)) from None
        for (s, _), job in zip(members, submitted):
            ledger.record(s, job)
        layout.save_state(ledger.sdir, ledger.state)
        log.info("submitted job array %s (%d runs%s)", submitted[0].job_id.split("_")[0], len(submitted),
                 f", {gpus} GPU(s) each" if gpus else "")


def array_groups(counts: list[int | None]) -> list[tuple[int | None, list[int]]]:
    """[(GPUs, indices)] for runs in submission order with these GPU `counts`: one group per stretch of
    equal consecutive counts, e.g. [4, 4, 2, 4] -> [(4, [0, 1]), (2, [2]), (4, [3])]. Grouping by count
    alone would queue the fourth run before the third."""
    groups: list[tuple[int | None, list[int]]] = []
    for i, c in enumerate(counts):
        if groups and groups[-1][0] == c:
            groups[-1][1].append(i)
        else:
            groups.append((c, [i]))
    return groups


def _run_debug(spec: SweepSpec, ex: Any, todo: list[RunStatus], args: list[tuple], ledger: _Ledger) -> None:
    """The debug launcher: each run in this process, one after another, its outcome recorded as it ends."""
    for s, a in zip(todo, args):
        job = ex.submit(SweepJob(spec.launcher.cpus_per_task), *a)
        ledger.record(s, job)
        layout.save_state(ledger.sdir, ledger.state)
        record_outcome(s.run.run_id, job, ledger.state, "FAILED", debug=True)
        layout.save_state(ledger.sdir, ledger.state)


def _refuse_beside_slurm(spec: SweepSpec, sdir: Path, kind: str, statuses: list[RunStatus]) -> None:
    """Refuse a local or debug dispatch while Slurm jobs of the sweep are queued or running: running
    those runs here too would train them twice at once, and leaving them to Slurm would end this
    dispatch with runs not done that nothing here can finish."""
    queued = [s.job_id for s in statuses if s.state in ("pending", "running")]
    if queued:
        shown = ", ".join(queued[:8]) + (f" and {len(queued) - 8} more" if len(queued) > 8 else "")
        arrays = " ".join(sorted({j.split("_")[0] for j in queued}))
        raise HarnessError(f"{sdir / layout.STATE_FILE}: {len(queued)} run(s) of sweep {spec.name} are queued or "
                           f"running on Slurm (job {shown}); launcher {kind} would train them a second time. Fix: "
                           f"wait for them (`harness status {spec.path}`), or `scancel {arrays}` and run this "
                           f"again. Nothing was started.")


def _repaired(spec: SweepSpec, results: Path, statuses: list[RunStatus]) -> list[RunStatus]:
    """Repair what can be rebuilt in the runs no job works on (`harness.launch.repair`: run.json from the
    spec, checkpoints without a sidecar); the statuses again if anything was repaired."""
    fixed = [line for s in statuses if s.state not in ("pending", "running") and s.dir.is_dir()
             for line in repair(s.run, s.dir)]
    return run_statuses(spec, results) if fixed else statuses


def _wait_slurm(jobs: dict[str, Any], state: dict, sdir: Path) -> None:
    """Poll sacct until every job in `jobs` ({run_id: job}) has ended; record each outcome."""
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
            if sched == "COMPLETED" and job_error(job) is None:
                state["runs"][run_id]["reason"] = None
            else:
                state["runs"][run_id]["reason"] = job_reason(job, sched)
                log.warning("run %s failed: %s", run_id, state["runs"][run_id]["reason"])
            del pending[run_id]
            layout.save_state(sdir, state)
        if pending:
            time.sleep(POLL_S)


# --------------------------------------------------------------------------- CLI
def add_sweep_arguments(s) -> None:
    """`harness sweep`'s flags."""
    add_spec_arguments(s)
    s.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help="override the spec's launcher.kind")
    s.add_argument("--results", default="results", help="results root")
    s.add_argument("--no-wait", action="store_true", help="submit and return (Slurm)")
    s.add_argument("--no-report", action="store_true", help="do not render the report at the end")
    s.add_argument("--dry-run", action="store_true",
                   help="check every input (data, weights, reference, folders, Slurm's sbatch --test-only), submit nothing")
    s.add_argument("--reports", default="reports", help="reports root of the closing report")


def cli_sweep(args: Any) -> int:
    """`harness sweep SPEC`: dispatch, print the statuses, and render the report when all are done."""
    spec = load_spec(args.sweep, args.overrides)
    results = Path(args.results or "results")
    if args.dry_run:
        require_ready(spec, results, args.launcher)
        runs = spec.expand()
        print(f"pre-flight passed: every input of the {len(runs)} run(s) of {spec.name} is in place "
              f"(launcher {args.launcher or spec.launcher.kind}); nothing was submitted")
        return 0
    statuses = dispatch(spec, results, args.launcher, wait=not args.no_wait)
    print(format_status(spec, statuses))
    if args.no_wait:
        return 0
    failed = [s for s in statuses if s.state != "done"]
    if failed:
        print(f"{len(failed)} run(s) not done; fix the reasons above and run the same command again "
              "(finished runs are kept, unfinished ones resume from their checkpoints)")
        return 1
    if not args.no_report:
        report_sweep(results, spec.path, args.reports or "reports")
    return 0
