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
        samples/          grid_step_XXXXXXX.png; samples_step_XXXXXXX_k<steps>_cfg<scale>_<setting>.npz (ADM layout,
                          one per evaluation setting, as many as eval.keep_samples keeps; a run evaluated before
                          the <setting> digest has ..._cfg<scale>.npz, still read: `RunFolder.samples_owners`)
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
from typing import Any, NamedTuple

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
#: an evaluation npz: step, sampling steps, cfg (as :g writes it), the setting's digest (absent in a legacy name)
_SAMPLES = re.compile(r"^samples_step_(\d{7,})_k(\d+)_cfg(\d+(?:\.\d+)?(?:e[+-]\d+)?)(?:_([0-9a-f]{8}))?\.npz$")

#: the keys of an eval.jsonl record that make two records the same measurement (its setting); they name its files
SETTING_KEYS = ("step", "num_samples", "sampling_steps", "sampler", "cfg_scale", "guidance_channels",
                "feature_space", "reference")


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


class SamplesName(NamedTuple):
    """What an evaluation npz's file name says: its setting's step, sampling steps and cfg scale, and the
    setting's digest (None in a legacy name, written before the digest)."""
    step: int
    sampling_steps: int
    cfg_scale: float
    digest: str | None


def setting_digest(setting: dict) -> str:
    """8 hex of a sha256 of a setting's SETTING_KEYS (a setting, or a record holding one; a key it lacks is null),
    the part of its files' names that keeps two settings of the same step and sampling apart."""
    whole = {k: setting.get(k) for k in SETTING_KEYS}
    return hashlib.sha256(json.dumps(whole, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _setting_stem(setting: dict) -> str:
    return f"step_{int(setting['step']):07d}_k{int(setting['sampling_steps'])}_cfg{float(setting['cfg_scale']):g}"


def features_name(setting: dict) -> str:
    """The FID features file of one evaluation setting (or of its record): fid_step_XXXXXXX_k<steps>_cfg<scale>
    _<setting_digest>.npy, so a second measurement of the same step and sampling (another num_samples, sampler or
    reference) never overwrites it."""
    return f"fid_{_setting_stem(setting)}_{setting_digest(setting)}.npy"


def samples_name(setting: dict) -> str:
    """The ADM npz of one evaluation setting (or of its record): samples_step_XXXXXXX_k<steps>_cfg<scale>
    _<setting_digest>.npz, kept apart from every other setting's as `features_name` is."""
    return f"samples_{_setting_stem(setting)}_{setting_digest(setting)}.npz"


def legacy_samples_name(setting: dict) -> str:
    """The name the same npz had before the digest (samples_step_XXXXXXX_k<steps>_cfg<scale>.npz): read, never
    written, since every setting of a step and sampling shared it."""
    return f"samples_{_setting_stem(setting)}.npz"


def samples_setting(name: str) -> SamplesName | None:
    """What an evaluation npz's file name says (`SamplesName`; a legacy name too), or None for any other name."""
    m = _SAMPLES.match(name)
    return SamplesName(int(m.group(1)), int(m.group(2)), float(m.group(3)), m.group(4)) if m else None


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

    def samples_npz(self, setting: dict) -> Path:
        """samples/<samples_name>: the ADM npz of a setting (or of its record)."""
        return self.samples / samples_name(setting)

    def samples_files(self) -> list[tuple[int, Path]]:
        """(step, path) of the evaluation npz files present, legacy names too, oldest step first."""
        if not self.samples.is_dir():
            return []
        return sorted((s.step, p) for p in self.samples.iterdir() if (s := samples_setting(p.name)) is not None)

    def samples_owners(self, records: list[dict]) -> dict[str, dict]:
        """{npz file name: the eval.jsonl record whose samples it holds}, over `records` (eval.jsonl's, in order).
        A record owns its `samples_name`. A legacy name (no digest) held whichever setting of its step, sampling
        steps and cfg scale was sampled last before the digest, so it belongs to a record of those three whose own
        `samples_name` is not in samples/ (a record with its own file was sampled after the digest, and a legacy
        file beside it is some earlier setting's): the last such record. Present or not, every name is listed."""
        owners: dict[str, dict] = {}
        for record in records:
            try:
                name, legacy = samples_name(record), legacy_samples_name(record)
            except (KeyError, TypeError, ValueError):
                continue   # no step, sampling steps or cfg scale: no file of its own
            owners[name] = record
            if not (self.samples / name).exists():
                owners[legacy] = record
        return owners

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
