"""`harness sweep` / `harness status`: real submitit jobs (debug in-process; Slurm on the local cluster)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.launch.dispatch import dispatch, sweep_lock
from harness.launch.status import run_statuses
from harness.errors import HarnessError
from harness.io import read_jsonl
from harness.config.spec import load_spec
from slurm_tools import need_slurm, wait_until

EXE = Path(sys.executable).with_name("harness")

TINY = """\
name: {name}
models: [DiT-2x32x2/4]
data: {{dataset: digits, image_size: 8}}
train: {{steps: {steps}, global_batch: 16, lr: 1.0e-3, ckpt_every: 10, log_every: 5, keep_last: 2}}
eval: {{at_steps: [{steps}], num_samples: 20, sampling_steps: [4], sampler: ddim, metrics: [fid], batch_size: 20}}
launcher: {{kind: {kind}, cpus_per_task: 1, mem_gb: 2, timeout_min: 10}}
"""


def tiny(tmp_path: Path, name: str = "tiny", steps: int = 10, kind: str = "debug") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.format(name=name, steps=steps, kind=kind))
    return path


def test_bad_spec_dispatches_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.format(name="bad", steps=10, kind="debug").replace("steps: 10,", "stepz: 10,"))
    results = tmp_path / "results"
    proc = subprocess.run([str(EXE), "sweep", str(bad), "--results", str(results)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.stepz" in proc.stderr and "did you mean 'steps'" in proc.stderr
    assert not results.exists()


def test_second_dispatch_is_locked_out(tmp_path):
    spec = load_spec(tiny(tmp_path))
    with sweep_lock(tmp_path / "results" / spec.name):
        with pytest.raises(HarnessError, match="being dispatched by pid"):
            dispatch(spec, tmp_path / "results", "debug")
    assert not (tmp_path / "results" / spec.name / "runs").exists()


def test_missing_source_sweep_is_refused(tmp_path):
    (tmp_path / "src.yaml").write_text(TINY.format(name="src", steps=10, kind="debug"))
    path = tmp_path / "evalonly.yaml"
    path.write_text(TINY.format(name="evalonly", steps=10, kind="debug").replace(
        "name: evalonly", "name: evalonly\ncheckpoints_from: src"))
    with pytest.raises(HarnessError, match="no results of sweep 'src'"):
        dispatch(load_spec(path), tmp_path / "results", "debug")


@pytest.mark.slow
def test_debug_sweep_runs_reruns_and_reuses_checkpoints(tmp_path):
    results = tmp_path / "results"
    spec = load_spec(tiny(tmp_path, "src"))
    [status] = dispatch(spec, results, "debug")
    assert status.state == "done" and status.evals == (1, 1), status
    run = json.loads((status.dir / "run.json").read_text())
    assert run["run_id"] == status.run.run_id and run["gflops"] > 0 and run["depth"] == 2
    lines = (status.dir / "train.jsonl").read_text()
    # a rerun skips the finished run: no new records
    [again] = dispatch(spec, results, "debug")
    assert again.state == "done" and (status.dir / "train.jsonl").read_text() == lines
    # an evaluation-only sweep reuses the checkpoint at step 10 and trains nothing
    path = tmp_path / "evalonly.yaml"
    path.write_text(TINY.format(name="evalonly", steps=10, kind="debug").replace(
        "name: evalonly", "name: evalonly\ncheckpoints_from: src").replace("sampling_steps: [4]",
                                                                            "sampling_steps: [2, 4]"))
    [ev] = dispatch(load_spec(path), results, "debug")
    assert ev.state == "done" and ev.evals == (2, 2) and ev.run.run_id == status.run.run_id
    assert not (ev.dir / "train.jsonl").exists()
    assert {r["sampling_steps"] for r in read_jsonl(ev.dir / "eval.jsonl")} == {2, 4}


# --------------------------------------------------------------------------- real Slurm
@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_cancelled_run_fails_with_reason_then_finishes(tmp_path, monkeypatch):
    need_slurm()
    monkeypatch.setenv("HARNESS_POLL_S", "1")
    results = tmp_path / "results"
    spec = load_spec(tiny(tmp_path, "cancel", steps=10, kind="slurm"))
    [st] = dispatch(spec, results, wait=False)
    assert st.state in ("pending", "running") and st.job_id
    subprocess.run(["scancel", st.job_id], check=True, timeout=30)
    wait_until(lambda: run_statuses(spec, results)[0].state == "failed", 60, "the cancelled job to show as failed")
    failed = run_statuses(spec, results)[0]
    assert failed.reason.startswith("CANCELLED"), failed.reason
    proc = subprocess.run([str(EXE), "status", str(spec.path), "--results", str(results)],
                          capture_output=True, text=True, timeout=120)
    assert "failed" in proc.stdout and "CANCELLED" in proc.stdout
    [done] = dispatch(spec, results)  # the next sweep resubmits it and waits
    assert done.state == "done" and done.job_id != st.job_id


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_requeue_resumes_from_checkpoint(tmp_path, monkeypatch):
    need_slurm()
    monkeypatch.setenv("HARNESS_POLL_S", "1")
    # 400 steps of a tiny model take 2-6 s: slowed to >= 20 s (sbatch exports this environment to the
    # job, also after the requeue) so the requeue always lands mid-training
    monkeypatch.setenv("HARNESS_TEST_STEP_DELAY_S", "0.05")
    results = tmp_path / "results"
    steps = 400
    spec = load_spec(tiny(tmp_path, "requeue", steps=steps, kind="slurm"))
    [st] = dispatch(spec, results, wait=False)
    wait_until(lambda: any((st.dir / "checkpoints").glob("step_*.pt.sha256")), 240, "the first checkpoint")
    assert not (st.dir / "done").exists(), "the run finished before it could be requeued"
    subprocess.run(["scontrol", "requeue", st.job_id], check=True, timeout=30)

    def requeued_pending() -> bool:
        out = subprocess.run(["squeue", "-h", "-j", st.job_id, "-o", "%T"], capture_output=True, text=True)
        return out.stdout.strip() == "PENDING"

    wait_until(requeued_pending, 120, "the requeued job to be pending again")
    # Slurm holds a requeued job back for a while (BeginTime); let it start now
    subprocess.run(["scontrol", "update", f"JobId={st.job_id}", "StartTime=now"], timeout=30)
    [done] = dispatch(spec, results)  # waits on the same job (not resubmitted)
    assert done.state == "done" and done.job_id == st.job_id
    logged = [r["step"] for r in read_jsonl(st.dir / "train.jsonl")]
    assert logged.count(5) == 1 and logged.count(10) == 1, logged  # never restarted from step 0
    assert logged[-1] == steps
    assert "resumed" in (st.dir / "logs" / "job.log").read_text()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("launcher, key, said", [
    ("gpus_per_node: 4, tasks_per_node: 1", "launcher.gpus_per_node, cpus_per_task or mem_gb",
     "Requested node configuration is not available"),
    ("gpus_per_node: 4", "launcher.tasks_per_node, gpus_per_node (one rank per GPU) or cpus_per_task",
     "More processors requested than permitted"),
    ("partition: no-such-partition", "launcher.partition", "invalid partition specified"),
])
def test_sbatch_refusal_is_one_line_naming_the_spec_key(tmp_path, launcher, key, said):
    """The real local Slurm (2 CPUs, 2 fake GPUs) refuses what the spec asks (more GPUs or ranks than its node has,
    a partition it does not have) at pre-flight, through `sbatch --test-only`: one problem line naming the spec key to change and sbatch's
    own words, exit 2, no traceback, and nothing submitted or written."""
    need_slurm()
    path = tiny(tmp_path, "refused", kind="slurm")
    path.write_text(path.read_text().replace("kind: slurm,", f"kind: slurm, {launcher},"))
    results = tmp_path / "results"
    proc = subprocess.run([str(EXE), "sweep", str(path), "--results", str(results), "--no-wait"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    head, line = [x for x in proc.stderr.splitlines() if not x[:2].isdigit()]  # the rest are timestamped logs
    assert head.startswith(f"error: {path}: 1 problem(s) found before submitting anything"), head
    assert line.strip().startswith(f"{key}: Slurm refuses the job (sbatch --test-only: ") and said in line, line
    assert not results.exists()
    status = subprocess.run([str(EXE), "status", str(path), "--results", str(results)], capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0 and " new " in status.stdout, status.stdout


@pytest.mark.parametrize("said, key", [
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     "launcher.account"),
    ("sbatch: error: Batch job submission failed: Invalid qos specification", "launcher.qos"),
    ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
     "launcher.timeout_min"),
    ("sbatch: error: Something new", "launcher (partition, account"),
])
def test_sbatch_refusals_that_a_local_cluster_cannot_produce_name_their_key(tmp_path, said, key):
    """Account, QOS and time-limit refusals need an accounting database the local cluster lacks;
    their wording is Slurm's (src/common/slurm_errno.c)."""
    from harness.launch.dispatch import _sbatch_refusal

    spec = load_spec(tiny(tmp_path, kind="slurm"))
    msg = str(_sbatch_refusal(spec, RuntimeError(said)))
    assert key in msg and said.removeprefix("sbatch: error: ") in msg and "\n" not in msg


def test_status_reads_each_train_log_once(tmp_path, monkeypatch):
    """`harness status` takes a run's step and its pace from one read of its train.jsonl."""
    import harness.launch.status as status_mod
    from harness.config import layout
    from harness.io import append_jsonl

    spec, results = load_spec(tiny(tmp_path)), tmp_path / "results"
    [run] = spec.expand()
    rdir = layout.run_dir(results, spec.name, run.run_id)
    for step in (1, 2, 3):
        append_jsonl(layout.RunFolder(rdir).train_log, {"step": step, "wall_s": 2.0 * step, "images_per_s": 40.0,
                                                       "steps_per_s": 0.5})
    reads = []

    def counting(path):
        reads.append(Path(path).name)
        return read_jsonl(path)

    monkeypatch.setattr(status_mod, "read_jsonl", counting)
    [seen] = run_statuses(spec, results, query_scheduler=False)
    table = status_mod.format_status(spec, [seen])
    assert reads.count("train.jsonl") == 1
    assert seen.step == 3 and seen.state == "interrupted" and seen.progress.elapsed_s == 6.0
    assert f"3/{run.train.steps}" in table and "40" in table
