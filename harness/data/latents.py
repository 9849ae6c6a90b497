"""The latent stage as a job of its own: every task (one per GPU) encodes its share of the cache's
shards before any training job starts, so no training allocation waits on a lock or a barrier.

    stages(runs)                     the distinct (dataset, autoencoder, image size) of a sweep
    LatentJob(cpus)(stage)           submitit callable: task i of n encodes shards i, i+n, ...
    run_latent_stage(...)            the dispatcher's hook: Slurm: submit one latent job per stage and
                                     make the training executor wait for it (afterok); local/debug:
                                     build the caches here, first
    `harness latents`                the same by hand: --shard I/N (or 'slurm'), --tasks N

The cache itself (shards, manifest, per-shard seeds) is harness.data.autoencoder's.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from harness.errors import HarnessError
from harness.config.arguments import positive_int
from harness.config.spec import AUTOENCODERS

log = logging.getLogger(__name__)

#: images per encoder batch in a dispatched latent job (per GPU)
LATENT_BATCH = 64


@dataclass(frozen=True)
class LatentStage:
    """One cache to build: what `harness latents` takes on its command line."""
    data: str
    autoencoder: str
    autoencoder_path: str | None
    image_size: int
    batch_size: int = LATENT_BATCH
    shard_size: int | None = None  # images per shard (None: harness.data.autoencoder.SHARD_SIZE)

    def build(self, task: tuple[int, int] = (0, 1), num_workers: int | None = None) -> Any:
        """harness.data.autoencoder.build_latent_cache for this stage: the LatentCache, or None when other
        tasks still own unfinished shards."""
        # torch and diffusers: dispatch imports this module to plan the stage
        from harness.data.autoencoder import SHARD_SIZE, build_latent_cache, load_autoencoder

        ae = load_autoencoder(self.autoencoder, self.autoencoder_path)
        return build_latent_cache(self.data, ae, self.image_size, self.batch_size, num_workers=num_workers,
                                  shard_size=self.shard_size or SHARD_SIZE, task=task)


def stages(runs: Iterable[Any]) -> list[LatentStage]:
    """The distinct latent caches `runs` (RunSpecs) train from, in first-seen order."""
    out: dict[LatentStage, None] = {}
    for run in runs:
        if run.checkpoints_from or run.train.steps == 0:  # evaluates existing weights: trains on nothing
            continue
        d = run.data
        source = d.resolved_path() if d.dataset == "imagefolder" else d.dataset
        out[LatentStage(str(source), d.autoencoder, d.resolved_autoencoder_path(), int(d.image_size))] = None
    return list(out)


def _task() -> tuple[int, int]:
    """(global rank, number of tasks) of this submitit job; (0, 1) outside one."""
    try:
        import submitit

        env = submitit.JobEnvironment()
        return env.global_rank, env.num_tasks
    except Exception:  # noqa: BLE001 - not in a submitit job
        return 0, 1


class LatentJob:
    """submitit callable: `LatentJob(cpus)(stage_dict)` encodes this task's shards of the stage.

    Checkpointable: on timeout or preemption submitit requeues the same call, which skips the shards
    already written. On a CPU a task uses cpus_per_task torch threads.
    """

    def __init__(self, cpus_per_task: int | None = None):
        self.cpus_per_task = cpus_per_task

    def __call__(self, stage: dict) -> str | None:
        import torch

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        rank, ntasks = _task()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
                                  % torch.cuda.device_count())
        elif self.cpus_per_task:
            torch.set_num_threads(self.cpus_per_task)
        cache = LatentStage(**stage).build(task=(rank, ntasks))
        return None if cache is None else str(cache.root)

    def checkpoint(self, stage: dict) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(LatentJob(self.cpus_per_task), stage)


def submit_latent_job(ex: Any, stage: LatentStage, tasks: int, cpus_per_task: int | None = None) -> Any:
    """Submit `stage` through the submitit executor `ex` (Slurm: one job of `tasks` tasks on one node,
    one per GPU when the executor asks for GPUs); returns the submitit job."""
    params: dict[str, Any] = {"name": f"dit-latents-{Path(stage.data).name}-{stage.image_size}px",
                              "tasks_per_node": tasks}
    ex.update_parameters(**params)
    job = ex.submit(LatentJob(cpus_per_task), asdict(stage))
    log.info("latent stage %s: job %s (%d tasks)", stage, job.job_id, tasks)
    return job


def run_latent_stage(spec: Any, runs: list[Any], kind: str, train_ex: Any, latent_ex: Any) -> list[str]:
    """The dispatcher's hook, before it submits `runs`: on Slurm, one latent job per stage (one task
    per GPU of a node, launcher.cpus_per_task each) and the training executor `train_ex` made to
    start only after they succeed (`--dependency=afterok:...`); local and debug build the caches here,
    now. Returns the latent job ids (none off Slurm)."""
    if not runs:
        return []
    if kind != "slurm":
        for stage in stages(runs):
            stage.build()
        return []
    L = spec.launcher
    ids = [str(submit_latent_job(latent_ex, stage, L.ranks_per_node, L.cpus_per_task).job_id)
           for stage in stages(runs)]
    train_ex.update_parameters(slurm_dependency="afterok:" + ":".join(ids))
    return ids


# ----------------------------------------------------------------------------- `harness latents`
def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N); 'slurm' -> this Slurm task's (SLURM_PROCID, SLURM_NTASKS); None -> (0, 1)."""
    if text is None:
        return 0, 1
    if text == "slurm":
        return int(os.environ.get("SLURM_PROCID", 0)), int(os.environ.get("SLURM_NTASKS", 1))
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise HarnessError(f"--shard {text!r}: write I/N (task I of N, 0 <= I < N) or 'slurm'.") from None
    if not (n >= 1 and 0 <= i < n):
        raise HarnessError(f"--shard {text!r}: I must satisfy 0 <= I < N.")
    return i, n


def _spawn_tasks(args: Any, n: int) -> None:
    """Run `harness latents ... --shard i/n` as n local processes (GPU i each, when there are GPUs)."""
    import torch

    gpus = torch.cuda.device_count()
    base = [sys.executable, "-m", "harness", "latents", "--data", str(args.data), "--autoencoder", args.autoencoder,
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
    if args.autoencoder_path:
        base += ["--autoencoder-path", str(args.autoencoder_path)]
    if args.workers is not None:
        base += ["--workers", str(args.workers)]
    procs = []
    for i in range(n):
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus else {}))
        procs.append(subprocess.Popen([*base, "--shard", f"{i}/{n}"], env=env))
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise HarnessError(f"latent tasks {failed} of {n} failed (their errors are above); rerun the same "
                           "command: finished shards are kept.")


def add_latents_arguments(s) -> None:
    """`harness latents`'s flags."""
    s.add_argument("--data", required=True, help="'digits' or an ImageFolder path (ImageNet train layout)")
    s.add_argument("--autoencoder", default="sd-vae-ft-ema", choices=AUTOENCODERS)
    s.add_argument("--autoencoder-path", default=None, help="local folder of the VAE weights")
    s.add_argument("--image-size", type=positive_int, default=256)
    s.add_argument("--batch-size", type=positive_int, default=32)
    s.add_argument("--allow-download", action="store_true", help="let diffusers fetch the VAE from the hub")
    s.add_argument("--shard", default=None, help="I/N: encode only task I's share of N (shards I, I+N, ...); "
                   "'slurm': this Slurm task's (SLURM_PROCID/SLURM_NTASKS)")
    s.add_argument("--tasks", type=positive_int, default=1, help="run N tasks here (one per GPU), then finish")
    s.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per task (default: the task's CPUs less one)")


def cli_latents(args: Any) -> int:
    """`harness latents`: build (or find) the latent cache ahead of training, whole or one task's share."""
    # torch and diffusers: dispatch imports this module to plan the stage
    from harness.data.autoencoder import load_autoencoder

    load_autoencoder(args.autoencoder, args.autoencoder_path, args.allow_download)  # fetch/check once
    stage = LatentStage(str(args.data), args.autoencoder, args.autoencoder_path, args.image_size, args.batch_size)
    t0 = time.perf_counter()
    if args.tasks > 1 and args.shard is not None:
        raise HarnessError("--tasks N runs all N tasks here; --shard I/N runs one of them: give one of the two.")
    if args.tasks > 1:
        _spawn_tasks(args, args.tasks)
        cache = stage.build()  # every shard is there: finds the cache (or writes its manifest)
    else:
        cache = stage.build(task=parse_shard(args.shard), num_workers=args.workers)
    if cache is None:
        print(f"task {args.shard}: its shards are written; the other tasks' are still missing "
              f"({time.perf_counter() - t0:.1f}s)")
        return 0
    m = cache.manifest
    print(f"{cache.root}\n  {m['num_items']} images x 2 flips, latents {tuple(m['latent_shape'])} {m['dtype']}, "
          f"{m['num_classes']} classes, autoencoder {m['autoencoder']}")
    return 0
