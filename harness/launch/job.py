"""The worker side: what runs inside one sweep job (a Slurm array task or a local process).

`SweepJob` is the submitit callable: it sets up logging into runs/<run_id>/logs/job.log, stages the
source sweep's checkpoints for `checkpoints_from` sweeps, and calls the trainer, which resumes from
the newest valid checkpoint. It is checkpointable: on preemption or time limit submitit requeues
the same call (and `scontrol requeue` restarts it too).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.io import writing
from harness.config.layout import RunFolder, sidecar_path
from harness.config.spec import RunSpec

log = logging.getLogger(__name__)


def _global_rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "SUBMITIT_GLOBAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    try:
        import submitit

        return submitit.JobEnvironment().global_rank
    except Exception:  # noqa: BLE001 - not in a submitit job
        return 0


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (copy across file systems), atomically; an existing `dst` stays."""
    if dst.exists() or not src.exists():
        return
    tmp = dst.with_name(f".{dst.name}.stage.tmp")
    with writing(dst):
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            try:
                shutil.copy2(src, tmp)
            except OSError:
                tmp.unlink(missing_ok=True)  # no half-copied checkpoint left behind
                raise
        os.replace(tmp, dst)


def stage_checkpoints(run: RunSpec, source_dir: Path, rdir: Path) -> None:
    """Link (or copy) the source run's checkpoints at eval.at_steps, with their checksum files."""
    src_run, dst_run = RunFolder(source_dir), RunFolder(rdir)
    dst_run.checkpoints.mkdir(parents=True, exist_ok=True)
    for step in run.eval.at_steps:
        src, dst = src_run.checkpoint(step), dst_run.checkpoint(step)
        if not src.exists():
            raise HarnessError(
                f"{src}: missing, but sweep {run.sweep!r} (checkpoints_from: {run.checkpoints_from}) evaluates "
                f"step {step} of run {run.run_id}. Fix: finish that sweep first (harness sweep "
                f"sweeps/{run.checkpoints_from}.yaml), or evaluate steps it kept (eval.at_steps).")
        _link_or_copy(src, dst)
        _link_or_copy(sidecar_path(src), sidecar_path(dst))


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

        from harness.training.train import run_training  # torch: the submitting process never loads it

        if self.cpus_per_task and not torch.cuda.is_available():
            torch.set_num_threads(self.cpus_per_task)

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        path = Path(rdir)
        spec = RunSpec.from_dict(run, RunFolder(path).run_json)
        handler = None
        rank = _global_rank()
        if rank == 0:
            with writing(RunFolder(path).job_log):  # a full or read-only disk: one line naming the file
                RunFolder(path).logs.mkdir(parents=True, exist_ok=True)
                handler = logging.FileHandler(RunFolder(path).job_log)
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
