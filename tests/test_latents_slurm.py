"""The latent stage on the local Slurm cluster: a 2-task job builds the cache a single process
builds, a killed job resumes from its finished shards, and a sweep's training jobs wait for it."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data.autoencoder import SHARD_DELAY_ENV, LatentCache
from harness.data.latents import LatentStage, submit_latent_job
from slurm_tools import need_slurm, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _sacct(job_id: str, field: str) -> str | None:
    proc = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", field], capture_output=True, text=True,
                          timeout=30)
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return lines[0] if lines else None


def _wait_ended(job_id: str, timeout: float = 240) -> str:
    end = time.monotonic() + timeout
    state = None
    while time.monotonic() < end:
        state = (_sacct(job_id, "State") or "").split(" ")[0]
        if state in ENDED:
            return state
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not end in {timeout}s; last sacct state {state!r}")


def _stage(tmp_path: Path, images: int, shard_size: int) -> LatentStage:
    """An image folder of `images` random 20x24 images and a tiny real AutoencoderKL saved to disk."""
    from test_autoencoder import tiny_vae

    rng = np.random.default_rng(0)
    for i in range(images):
        folder = tmp_path / "imgs" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    tiny_vae().save_pretrained(tmp_path / "vae")
    return LatentStage(str(tmp_path / "imgs"), "sd-vae-ft-ema", str(tmp_path / "vae"), 16, batch_size=2,
                       shard_size=shard_size)


def _executor(folder: Path):
    import submitit

    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    ex.update_parameters(cpus_per_task=1, mem_gb=6, timeout_min=10)
    return ex


def _cache_under(root: Path) -> Path:
    [cache] = [p for p in (root / "latents").iterdir() if p.is_dir()]
    return cache


def test_two_task_latent_job_equals_one_process(tmp_path, monkeypatch):
    need_slurm()
    stage = _stage(tmp_path, images=6, shard_size=2)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "one"))
    one = stage.build(num_workers=0)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "two"))  # sbatch exports it to the job
    job = submit_latent_job(_executor(tmp_path / "jobs"), stage, tasks=2, cpus_per_task=1)
    assert _wait_ended(job.job_id) == "COMPLETED"
    logs = sorted((tmp_path / "jobs" / job.job_id).glob("*_log.err"))
    text = [p.read_text() for p in logs]
    assert len(logs) == 2 and "latent task 0/2: 2 of its 2 shards" in "".join(text), text
    assert "latent task 1/2: 1 of its 1 shards" in "".join(text), text
    two = LatentCache.open(_cache_under(tmp_path / "two"))
    assert two.manifest == one.manifest and len(one.manifest["shards"]) == 3
    for s in one.manifest["shards"]:
        assert np.array_equal(np.load(one.root / s["file"]), np.load(two.root / s["file"])), s["file"]


def test_killed_latent_job_resumes_from_its_finished_shards(tmp_path, monkeypatch):
    need_slurm()
    stage = _stage(tmp_path, images=12, shard_size=1)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "ref"))
    ref = stage.build(num_workers=0)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "job"))
    monkeypatch.setenv(SHARD_DELAY_ENV, "1.5")  # >= 18 s in all: the kill lands mid-way
    first = submit_latent_job(_executor(tmp_path / "jobs"), stage, tasks=1, cpus_per_task=1)
    shard_files = lambda: sorted((tmp_path / "job" / "latents").glob("*/shard_*.npy"))  # noqa: E731
    wait_until(lambda: len(shard_files()) >= 2, 180, "two finished shards", poll_s=0.2)
    subprocess.run(["scancel", first.job_id], check=True, timeout=30)
    assert _wait_ended(first.job_id) == "CANCELLED"
    # submitit ignores SIGTERM and Slurm kills the task KillWait seconds later: wait until it is gone
    # (no new shard for over three shard delays)
    seen, quiet_since = len(shard_files()), time.monotonic()
    while time.monotonic() - quiet_since < 5:
        time.sleep(0.2)
        if len(shard_files()) != seen:
            seen, quiet_since = len(shard_files()), time.monotonic()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_files()}
    assert 2 <= len(finished) < 12 and not (_cache_under(tmp_path / "job") / "manifest.json").exists()

    monkeypatch.setenv(SHARD_DELAY_ENV, "0")
    second = submit_latent_job(_executor(tmp_path / "jobs"), stage, tasks=1, cpus_per_task=1)
    assert _wait_ended(second.job_id) == "COMPLETED"
    log = "".join(p.read_text() for p in (tmp_path / "jobs" / second.job_id).glob("*_log.err"))
    assert f"{12 - len(finished)} of its 12 shards to encode" in log, log
    for p in shard_files():
        if p.name in finished:  # not re-encoded: the same file, untouched
            assert (p.stat().st_ino, p.stat().st_mtime_ns) == finished[p.name], p.name
    cache = LatentCache.open(_cache_under(tmp_path / "job"))
    assert np.array_equal(np.asarray(cache.arrays()[0]), np.asarray(ref.arrays()[0]))


SWEEP = """\
name: latdep
models: [DiT-2x32x2/4, DiT-2x32x2/2]
data: {dataset: digits, image_size: 8}
train: {steps: 4, global_batch: 16, lr: 1.0e-3, ckpt_every: 2, log_every: 2, keep_last: 2}
eval: {at_steps: [4], num_samples: 10, sampling_steps: [2], sampler: ddim, metrics: [fid], batch_size: 10}
launcher: {kind: slurm, cpus_per_task: 1, mem_gb: 3, timeout_min: 10}
"""


def test_sweep_submits_the_latent_job_first_and_training_after_it(tmp_path, monkeypatch):
    from harness.launch.dispatch import dispatch, run_statuses
    from harness.config.layout import load_state, sweep_dir
    from harness.config.spec import load_spec

    need_slurm()
    monkeypatch.setenv("HARNESS_POLL_S", "1")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))  # no digits cache yet: the job builds it
    monkeypatch.setenv(SHARD_DELAY_ENV, "5")  # the latent job outlives the checks below
    (tmp_path / "latdep.yaml").write_text(SWEEP)
    spec = load_spec(tmp_path / "latdep.yaml")
    results = tmp_path / "results"
    statuses = dispatch(spec, results, wait=False)
    [latent] = load_state(sweep_dir(results, spec.name))["latent_jobs"]
    train_ids = sorted({s.job_id for s in statuses})
    assert len(train_ids) == 2 and all(s.state == "pending" for s in statuses), statuses
    def held_by_latent_job(job_id: str) -> bool:
        shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        return f"Dependency=afterok:{latent}(unfulfilled)" in shown and "Reason=Dependency" in shown

    for job_id in train_ids:  # the scheduler states the reason on its next pass
        wait_until(lambda: held_by_latent_job(job_id), 20, f"job {job_id} to wait on the latent job {latent}",
                   poll_s=0.2)
    assert _wait_ended(latent) == "COMPLETED"
    assert all(s.state == "done" for s in dispatch(spec, results))  # waits on the same jobs
    assert {s.job_id for s in run_statuses(spec, results)} == set(train_ids)
    latent_end = _sacct(latent, "End")
    for job_id in train_ids:
        assert _sacct(job_id, "State") == "COMPLETED"
        assert _sacct(job_id, "Submit") >= _sacct(latent, "Submit") and _sacct(job_id, "Start") >= latent_end
