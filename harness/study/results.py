"""Run records <-> one tidy pandas DataFrame.

Reads each run folder's run.json (through `RunSpec.from_dict`: `layout.read_run_json`), eval.jsonl and
train.jsonl and, when present, the sweep's sweep.json (the runs `harness sweep` expects) and spec.yaml
(the files are named by `harness.config.layout`), to say which runs of a partial sweep are missing. One
row per evaluation record.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.config import layout
from harness.config.spec import RunSpec
from harness.errors import HarnessError
from harness.io import read_jsonl
from harness.config.vocab import METRIC_LABELS, guidance_on
from harness.paper import train_compute
from harness.config.specfile import Where, read_yaml

log = logging.getLogger(__name__)

# Metric column -> the label used in tables and figures (the metrics package owns both).
METRICS = METRIC_LABELS

# What proves two records' samples paired (harness.study.pairing), as eval.jsonl holds it (absent in older
# records); noise_seed (63 bits) and noise_shape are kept as text, so a missing value cannot round them.
PAIRING_COLUMNS = ["noise_seed", "noise_scheme", "noise_shape", "labels", "sample_batch", "sample_compiled"]

# The tidy table's columns, in order. train_compute is in Gflops: gflops x global_batch x step x 3
# (the backward pass costs twice the forward), the paper's convention.
COLUMNS = [
    "run_id", "model", "size", "patch", "depth", "hidden", "conditioning", "seed",
    "dataset", "image_size", "num_classes", "global_batch",
    "step", "gflops", "params", "tokens", "train_compute",
    "sampling_steps", "sampler", "sampler_impl", "sampler_version", "model_evaluations", "cfg_scale",
    "guidance_channels", "feature_space", "reference", "num_samples", *METRICS, "fid_se", "train_wall_s",
    "eval_wall_s", "eval_time", *PAIRING_COLUMNS, "fid_features",
]



@dataclass
class SweepResults:
    """Everything the report needs from the results folder of one sweep."""

    name: str
    root: Path                      # results/<name>
    frame: pd.DataFrame             # tidy: one row per evaluation record (COLUMNS)
    runs: list[dict]                # run.json of every run folder found, as RunSpec.to_dict() + the planner's keys
    expected: list[str] | None      # run ids from sweep.json, if present
    missing: dict[str, str] = field(default_factory=dict)  # run_id -> why it has no evaluation
    spec_text: str | None = None    # results/<name>/spec.yaml, if present
    throughput: dict[str, dict] = field(default_factory=dict)  # run_id -> train_throughput(train.jsonl)
    train_logs: dict[str, pd.DataFrame] = field(default_factory=dict)  # run_id -> train.jsonl, one row a line

    @property
    def run_ids(self) -> list[str]:
        return sorted(self.frame["run_id"].unique())


def sweep_name(sweep: str | Path) -> str:
    """The sweep's name: `name` from a sweeps/NAME.yaml file, or the argument itself as a bare name."""
    text = str(sweep)
    path = Path(text)
    if text.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise HarnessError(f"{path}: sweep spec not found; pass an existing sweeps/NAME.yaml or a bare sweep name")
        doc = read_yaml(path, Where(str(path)))  # bounded: a hostile file is refused, not expanded
        name = doc.get("name", path.stem) if isinstance(doc, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise HarnessError(f"{path}: key 'name' is empty; write e.g. `name: {path.stem}`")
        return name.strip()
    if not text or "/" in text or text.startswith("."):
        raise HarnessError(f"'{text}' is not a sweep name; pass sweeps/NAME.yaml or NAME")
    return text


def _train_wall(train_records: list[dict], step: int) -> float | None:
    """Training wall time (s) at the last log line at or before `step`."""
    best = None
    for rec in train_records:
        s, w = rec.get("step"), rec.get("wall_s")
        if s is not None and w is not None and s <= step and (best is None or s >= best[0]):
            best = (s, w)
    return None if best is None else float(best[1])


def _tokens(plan: dict) -> float | None:
    """Tokens per image: (input_size / patch)^2, the DiT sequence length (from run.json's planner keys)."""
    size, patch = plan.get("input_size"), plan.get("patch")
    return float((size // patch) ** 2) if size and patch else None


def train_throughput(train_records: list[dict]) -> dict | None:
    """A run's training speed from its train.jsonl: medians over the log lines after the first (which
    holds start-up and compilation) of images/s, steps/s, TFLOP/s per device and MFU; the micro-batch
    and compilation of the last line; the largest peak memory. None without log lines."""
    recs = [r for r in train_records if r.get("images_per_s") is not None]
    if not recs:
        return None
    steady = recs[1:] or recs

    def median(key: str) -> float | None:
        vals = [float(r[key]) for r in steady if r.get(key) is not None]
        return float(np.median(vals)) if vals else None

    peaks = [float(r["peak_mem_mb"]) for r in recs if r.get("peak_mem_mb") is not None]
    return {"images_per_s": median("images_per_s"), "steps_per_s": median("steps_per_s"),
            "tflops_per_device": median("tflops_per_device"), "mfu": median("mfu"),
            "micro_batch": recs[-1].get("micro_batch"), "compiled": recs[-1].get("compiled"),
            "peak_mem_mb": max(peaks) if peaks else None, "log_lines": len(recs)}


def _features_path(run_dir: Path, name: str | None) -> str | None:
    """The FID features file a record names (features/<name>), or None (an older record, or a name that is not one)."""
    if name is None:
        return None
    try:
        return str(layout.RunFolder(run_dir).features_file(name))
    except HarnessError as err:
        log.warning("%s", err)
        return None


def _rows_of_run(run: RunSpec, plan: dict, run_dir: Path, train: list[dict]) -> list[dict]:
    """One row per evaluation record of the run: `plan` holds run.json's planner keys (shape, Gflops, params)."""
    evals = list(read_jsonl(layout.RunFolder(run_dir).eval_log))
    gflops = plan.get("gflops")
    batch = run.train.global_batch
    rows = []
    for ev in evals:
        step = ev.get("step")
        if step is None:
            continue
        compute = None
        if gflops is not None:
            compute = train_compute(gflops, batch, step)
        row = {
            "run_id": run.run_id, "model": run.model, "size": plan.get("size"),
            "patch": plan.get("patch"), "depth": plan.get("depth"), "hidden": plan.get("hidden"),
            "conditioning": run.conditioning, "seed": run.seed,
            "dataset": run.data.dataset, "image_size": run.data.image_size,
            "num_classes": run.data.num_classes, "global_batch": batch,
            "step": int(step), "gflops": gflops, "params": plan.get("params"), "tokens": _tokens(plan),
            "train_compute": compute,
            "sampling_steps": ev.get("sampling_steps"), "sampler": ev.get("sampler"),
            "sampler_impl": ev.get("sampler_impl"), "sampler_version": ev.get("sampler_version"),
            "model_evaluations": ev.get("model_evaluations", ev.get("sampling_steps")),
            "cfg_scale": ev.get("cfg_scale"), "guidance_channels": ev.get("guidance_channels"),
            "feature_space": ev.get("features_id") or ev.get("feature_space"), "reference": ev.get("reference"),
            "num_samples": ev.get("num_samples"),
            "train_wall_s": _train_wall(train, int(step)), "eval_wall_s": ev.get("wall_s"), "eval_time": ev.get("time"),
        }
        for m in METRICS:
            row[m] = ev.get(m)
        row["fid_se"] = ev.get("fid_se")  # FID's bootstrap standard error over the samples (may be absent)
        row.update({k: ev.get(k) for k in PAIRING_COLUMNS})
        row["noise_seed"] = None if ev.get("noise_seed") is None else str(ev["noise_seed"])
        row["noise_shape"] = None if ev.get("noise_shape") is None else "x".join(map(str, ev["noise_shape"]))
        row["fid_features"] = _features_path(run_dir, ev.get("fid_features"))
        rows.append(row)
    return rows


def load_sweep(results_root: str | Path, sweep: str | Path) -> SweepResults:
    """Load every run record of a sweep. A partial sweep loads (missing runs are listed);
    a sweep with no evaluation at all raises HarnessError."""
    name = sweep_name(sweep)
    root = layout.sweep_dir(results_root, name)
    runs_dir = root / layout.RUNS_DIR
    expected = layout.read_expected_runs(root)
    runs, rows, missing, throughput, train_logs = [], [], {}, {}, {}
    run_dirs = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    for run_dir in run_dirs:
        if not layout.RunFolder(run_dir).run_json.is_file():
            missing[run_dir.name] = "no run.json (not planned or interrupted before start)"
            continue
        run, plan = layout.read_run_json(run_dir)
        runs.append({**run.to_dict(), **plan})
        train = list(read_jsonl(layout.RunFolder(run_dir).train_log))
        speed = train_throughput(train)
        if speed is not None:
            throughput[run.run_id] = speed
        if train:
            train_logs[run.run_id] = pd.DataFrame(train).sort_values("step", kind="stable")
        run_rows = _rows_of_run(run, plan, run_dir, train)
        if not run_rows:
            missing[run.run_id] = "no evaluation yet (eval.jsonl empty or absent)"
        rows.extend(run_rows)
    found = {r["run_id"] for r in runs} | set(missing)
    for rid in expected or []:
        if rid not in found:
            missing[rid] = "no run folder (never started, or removed)"
    if not rows:
        raise HarnessError(
            f"{runs_dir}: no evaluation records for sweep '{name}' "
            f"({len(run_dirs)} run folder(s), none with eval.jsonl); run `harness sweep sweeps/{name}.yaml` "
            f"first, or pass --results with the folder that holds {name}/runs/")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for col in ["gflops", "tokens", "train_compute", "cfg_scale", *METRICS, "fid_se", "train_wall_s", "eval_wall_s",
                "eval_time"]:
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    frame = frame.sort_values(["model", "conditioning", "seed", "step", "sampling_steps", "cfg_scale"],
                              na_position="last", kind="stable").reset_index(drop=True)
    spec_text = layout.read_spec_text(root)
    if missing:
        log.warning("sweep %s: %d run(s) without evaluation: %s", name, len(missing), ", ".join(sorted(missing)))
    return SweepResults(name=name, root=root, frame=frame, runs=runs, expected=expected,
                        missing=dict(sorted(missing.items())), spec_text=spec_text, throughput=throughput,
                        train_logs=train_logs)


def default_setting(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of the most common evaluation protocol (sampling_steps, sampler, cfg_scale, guidance,
    feature_space, reference, num_samples), preferring cfg_scale 1.0 (no guidance), as the paper's
    scaling figures do: FID-10K and FID-50K never share a curve or a fit."""
    keys = ["sampling_steps", "sampler", "cfg_scale", "guidance_channels", "feature_space", "reference",
            "num_samples"]
    key = pd.Series(["|".join(map(str, row)) for row in frame[keys].itertuples(index=False)], index=frame.index)
    unguided = ~frame["cfg_scale"].map(guidance_on).astype(bool)
    pool = key[unguided] if unguided.any() else key
    top = pool.value_counts(sort=True).index[0]
    return frame[key == top]


def main_conditioning(frame: pd.DataFrame) -> str:
    """adaLN-Zero if the sweep has it (the paper's scaling runs), else the most common block."""
    conds = frame["conditioning"].dropna()
    if (conds == "adaLN-Zero").any() or conds.empty:
        return "adaLN-Zero"
    return str(conds.value_counts().index[0])
