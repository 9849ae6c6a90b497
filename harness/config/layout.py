"""The results folder contract: every path and file name under results/<sweep>/, in one place.

    results/<sweep>/
      sweep.json          {"sweep": name, "runs": [run_id, ...]}: the runs the sweep expects
      spec.yaml           the sweep spec as it was last dispatched
      sweep_state.json    job id, launcher, attempts and last failure of every run (atomic)
      .sweep.lock         held (flock) by the `harness sweep` dispatching this sweep
      jobs/<job id>/      submitit's pickles and stdout/stderr of each job
      runs/<run_id>/      one run (`RunFolder`):
        run.json          the resolved run: RunSpec.to_dict() + RUN_JSON_PLAN_KEYS (shape, Gflops, params)
        train.jsonl       step, loss, steps/s, images/s, TFLOP/s, MFU, micro-batch, peak memory (append-only)
        eval.jsonl        one record per evaluation setting (append-only)
        checkpoints/      step_XXXXXXX.pt + step_XXXXXXX.pt.sha256
        samples/          grid_step_XXXXXXX.png; samples_step_XXXXXXX_k<steps>_cfg<scale>.npz (ADM layout, one
                          per evaluation setting, as many as eval.keep_samples keeps)
        features/         fid_step_XXXXXXX_k<steps>_cfg<scale>_<setting>.npy: each evaluation's FID features
                          (N, D) in sample order, named in its eval.jsonl record (`fid_features`)
        logs/             job.log and links to the run's submitit folders
        done              written when training and every evaluation are complete
        .run.lock         held (flock) by the trainer of this run

Writers and readers (dispatch, the job, status, the local pool, the trainer, evaluation, results,
the report and checkpoint.py) ask this module for the names and use its writers. run.json has one
writer, `write_run_json`, which the trainer also calls for a standalone `harness train`; the results'
reader, `read_run_json`, goes through `RunSpec.from_dict` as every reader of a run record does. Nothing
here imports torch.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config.spec import RUN_JSON_PLAN_KEYS, RunSpec
from harness.errors import HarnessError
from harness.io import atomic_write_json, atomic_write_text

SWEEP_JSON = "sweep.json"
SPEC_YAML = "spec.yaml"
STATE_FILE = "sweep_state.json"
LOCK_FILE = ".sweep.lock"
JOBS_DIR = "jobs"
RUNS_DIR = "runs"

_CHECKPOINT = re.compile(r"^step_(\d{7,})\.pt$")
_GRID = re.compile(r"^grid_step_(\d{7,})\.png$")
_SAMPLES = re.compile(r"^samples_step_(\d{7,})_k(\d+)_cfg(\d+(?:\.\d+)?(?:e[+-]\d+)?)\.npz$")  # cfg as :g writes it


# --------------------------------------------------------------------------- names
def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint file name (step_XXXXXXX.pt), or None for any other name."""
    m = _CHECKPOINT.match(name)
    return int(m.group(1)) if m else None


def sidecar_path(checkpoint: Path) -> Path:
    """The SHA-256 file written next to a checkpoint once it is complete."""
    return checkpoint.with_name(checkpoint.name + ".sha256")


def features_name(setting: dict) -> str:
    """The FID features file of one evaluation setting (eval.jsonl's setting keys: step, sampling_steps,
    cfg_scale, ...): fid_step_XXXXXXX_k<steps>_cfg<scale>_<8 hex of the whole setting>.npy, so a second
    measurement of the same step and sampling (another num_samples, sampler or reference) never overwrites it."""
    digest = hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return (f"fid_step_{int(setting['step']):07d}_k{int(setting['sampling_steps'])}_cfg{float(setting['cfg_scale']):g}"
            f"_{digest}.npy")


def samples_name(step: int, sampling_steps: int, cfg_scale: float) -> str:
    """The ADM npz of one evaluation setting: samples_step_XXXXXXX_k<sampling steps>_cfg<scale>.npz."""
    return f"samples_step_{int(step):07d}_k{int(sampling_steps)}_cfg{float(cfg_scale):g}.npz"


def samples_setting(name: str) -> tuple[int, int, float] | None:
    """(step, sampling steps, cfg scale) of an evaluation npz's file name, or None for any other name."""
    m = _SAMPLES.match(name)
    return (int(m.group(1)), int(m.group(2)), float(m.group(3))) if m else None


def sweep_dir(results: str | Path, sweep: str) -> Path:
    """results/<sweep>/."""
    return Path(results) / sweep


def run_dir(results: str | Path, sweep: str, run_id: str) -> Path:
    """results/<sweep>/runs/<run_id>/."""
    return sweep_dir(results, sweep) / RUNS_DIR / run_id


@dataclass(frozen=True)
class RunFolder:
    """The files of one run folder, results/<sweep>/runs/<run_id>/."""

    root: Path

    run_json = property(lambda self: self.root / "run.json")
    train_log = property(lambda self: self.root / "train.jsonl")
    eval_log = property(lambda self: self.root / "eval.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    samples = property(lambda self: self.root / "samples")
    features = property(lambda self: self.root / "features")
    logs = property(lambda self: self.root / "logs")
    job_log = property(lambda self: self.root / "logs" / "job.log")
    done = property(lambda self: self.root / "done")
    lock = property(lambda self: self.root / ".run.lock")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def checkpoint_steps(self) -> list[int]:
        """Steps of the checkpoint files present, oldest first (validity not checked)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(s for s in (checkpoint_step(p.name) for p in self.checkpoints.iterdir()) if s is not None)

    def grid(self, step: int) -> Path:
        return self.samples / f"grid_step_{step:07d}.png"

    def features_file(self, name: str) -> Path:
        """features/<name>: a record's `fid_features` (a bare file name; anything else is refused)."""
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise HarnessError(f"{self.root / 'eval.jsonl'}: fid_features {name!r} is not a file name of "
                               f"features/. Fix: delete that key from the record (its FID stays)")
        return self.features / name

    def samples_npz(self, step: int, sampling_steps: int, cfg_scale: float) -> Path:
        return self.samples / samples_name(step, sampling_steps, cfg_scale)

    def samples_files(self) -> list[tuple[int, Path]]:
        """(step, path) of the evaluation npz files present, oldest step first."""
        if not self.samples.is_dir():
            return []
        return sorted((s[0], p) for p in self.samples.iterdir() if (s := samples_setting(p.name)) is not None)

    def newest_grid(self) -> tuple[int, Path] | None:
        """(step, path) of the newest sample grid, or None."""
        if not self.samples.is_dir():
            return None
        found = sorted((int(m.group(1)), p) for p in self.samples.iterdir() if (m := _GRID.match(p.name)))
        return found[-1] if found else None


# --------------------------------------------------------------------------- run.json
def write_run_json(run: RunSpec, rdir: Path, gflops: float, params: int) -> None:
    """Write rdir/run.json, the only writer: the run (a RunSpec), its shape, and the model's forward
    Gflops and parameters as the caller counted them (`harness.cost.plan.record_run`, the trainer)."""
    planned = {**run.shape.to_dict(), "gflops": gflops, "params": params, "input_size": run.data.input_size,
               "in_channels": run.data.channels}
    record = run.to_dict()
    record.update({k: planned[k] for k in RUN_JSON_PLAN_KEYS})
    atomic_write_json(RunFolder(Path(rdir)).run_json, record)


def read_json(path: Path, what: str, fix: str) -> Any:
    """A JSON file of the results folder; HarnessError naming the file and the fix if unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HarnessError(f"{path}: unreadable {what} ({err}). Fix: {fix}") from err


def read_run_json(rdir: Path) -> tuple[RunSpec, dict]:
    """rdir/run.json through `RunSpec.from_dict`: the run, and the planner's keys the record holds
    (RUN_JSON_PLAN_KEYS: shape, Gflops, params). A record written before a key existed takes that key's
    default; one without its run id or sweep takes its folder's (results/<sweep>/runs/<run_id>/)."""
    rdir = Path(rdir)
    path = RunFolder(rdir).run_json
    fix = ("run `harness sweep` on its spec: it rewrites run.json from the spec and keeps the checkpoints and "
           "evaluations")
    record = read_json(path, "run record", fix)
    if not isinstance(record, dict):
        raise HarnessError(f"{path}: the run record is not a JSON object. Fix: {fix}")
    run = RunSpec.from_dict({"run_id": rdir.name, "sweep": rdir.parent.parent.name, **record}, path,
                            required=("model",))
    return run, {k: record[k] for k in RUN_JSON_PLAN_KEYS if k in record}


# --------------------------------------------------------------------------- the sweep's own files
def write_sweep_record(sdir: Path, run_ids: list[str], spec_text: str) -> None:
    """sweep.json (the runs the sweep expects) and spec.yaml (the spec as run), atomically."""
    sdir = Path(sdir)
    atomic_write_json(sdir / SWEEP_JSON, {"sweep": sdir.name, "runs": list(run_ids)})
    atomic_write_text(sdir / SPEC_YAML, spec_text)


def read_expected_runs(sdir: Path) -> list[str] | None:
    """The run ids sweep.json lists, or None when the sweep has no sweep.json."""
    path = Path(sdir) / SWEEP_JSON
    if not path.is_file():
        return None
    ids = read_json(path, "sweep record", "delete it; the next `harness sweep` rewrites it").get("runs")
    return [str(i) for i in ids] if isinstance(ids, list) else None


def read_spec_text(sdir: Path) -> str | None:
    path = Path(sdir) / SPEC_YAML
    return path.read_text(errors="replace") if path.is_file() else None


# --------------------------------------------------------------------------- sweep state
def load_state(sdir: Path) -> dict:
    """The sweep state {"runs": {run_id: {launcher, job_id, job_folder, submitted, attempts, reason}}}."""
    path = Path(sdir) / STATE_FILE
    if not path.exists():
        return {"runs": {}}
    return read_json(path, "sweep state", "move it aside; the next `harness sweep` rebuilds it from the run "
                                          "folders (finished runs are kept).")


def save_state(sdir: Path, state: dict) -> None:
    atomic_write_json(Path(sdir) / STATE_FILE, state)
