"""Synthetic run records (the shared schema) from a known law, for the analysis and report tests.

FID(model, step) = 20 * G^-0.4 + 400 * step^-0.5 (+ multiplicative noise): bigger models saturate
lower, smaller ones are cheaper per step, so the compute frontier has real crossovers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from harness.io import append_jsonl, atomic_write_json
from harness.config.layout import write_sweep_record
from harness.study.results import load_sweep

# name -> (size, patch, depth, hidden, heads, gflops)
MODELS = {
    "DiT-S/4": ("S", 4, 12, 384, 6, 0.05),
    "DiT-S/2": ("S", 2, 12, 384, 6, 0.2),
    "DiT-B/2": ("B", 2, 12, 768, 12, 0.8),
}
STEPS = [250, 500, 1000, 2000]
BATCH = 64


def true_fid(gflops: float, step: int) -> float:
    return 20 * gflops ** -0.4 + 400 * step ** -0.5


def run_id(model: str, cond: str, seed: int) -> str:
    return f"{model.replace('/', '-')}_{cond}_s{seed}_synth"


def write_run(runs: Path, model: str, cond: str, seed: int, rng: np.random.Generator, steps=STEPS,
              sampling: bool = False, grid: bool = True, noise: float = 0.02) -> str:
    size, patch, depth, hidden, heads, gflops = MODELS[model]
    rid = run_id(model, cond, seed)
    d = runs / rid
    atomic_write_json(d / "run.json", {
        "run_id": rid, "sweep": runs.parent.name, "model": model, "size": size, "patch": patch, "depth": depth,
        "hidden": hidden, "heads": heads, "conditioning": cond, "seed": seed, "gflops": gflops, "input_size": 8,
        "params": int(1e6 * hidden / 100),
        "data": {"dataset": "digits", "image_size": 8, "num_classes": 10, "autoencoder": "identity"},
        "train": {"steps": max(steps), "global_batch": BATCH, "lr": 1e-4}, "eval": {}})
    penalty = 1.0 if cond == "adaLN-Zero" else 1.25
    for step in range(50, max(steps) + 1, 250):
        append_jsonl(d / "train.jsonl", {"step": step, "loss": 0.1, "wall_s": step * 0.01 * (1 + gflops)})
    for step in steps:
        settings = [(50, 1.0)]
        if sampling and step == max(steps):
            settings = [(10, 1.0), (25, 1.0), (50, 1.0), (50, 1.5)]
        for n_steps, cfg in settings:
            fid = true_fid(gflops, step) * penalty * (1 + 3.0 / n_steps) * (0.8 if cfg > 1 else 1.0)
            fid *= float(np.exp(rng.normal(0, noise)))
            append_jsonl(d / "eval.jsonl", {
                "step": step, "num_samples": 500, "sampling_steps": n_steps, "sampler": "ddim",
                "cfg_scale": cfg, "guidance_channels": 3, "feature_space": "digits", "reference": "digits",
                "fid": fid, "sfid": fid * 1.3, "inception_score": 8.0 - fid / 20, "precision": 0.5,
                "recall": 0.4, "wall_s": 1.0, "time": "2025-01-01T00:00:00"})
    if grid:
        img = (rng.random((40, 40)) * 255).astype(np.uint8)
        img[::10, :] = 0
        (d / "samples").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / "samples" / f"grid_step_{max(steps):07d}.png")
    return rid


def load_results(results_root: Path, sweep: str) -> pd.DataFrame:
    """The tidy DataFrame of a sweep (one row per evaluation record; columns results.COLUMNS)."""
    return load_sweep(results_root, sweep).frame


def write_sweep(results: Path, name: str = "synth", conditioning_ablation: bool = True,
                sampling: bool = True, n_missing: int = 0, seed: int = 0) -> dict:
    """Write results/<name>/ with one run per model (plus an adaLN run of DiT-S/2 when asked).
    `n_missing` extra expected runs: the first has run.json but no evaluation, the rest no folder.
    Returns {"evaluated": [...], "missing": [...]}."""
    rng = np.random.default_rng(seed)
    runs = results / name / "runs"
    evaluated = [write_run(runs, m, "adaLN-Zero", 0, rng, sampling=sampling) for m in MODELS]
    if conditioning_ablation:
        evaluated.append(write_run(runs, "DiT-S/2", "adaLN", 0, rng))
    missing = []
    for k in range(n_missing):
        rid = run_id("DiT-B/2", "adaLN-Zero", 100 + k)
        if k == 0:
            size, patch, depth, hidden, heads, gflops = MODELS["DiT-B/2"]
            atomic_write_json(runs / rid / "run.json", {
                "run_id": rid, "model": "DiT-B/2", "size": size, "patch": patch, "conditioning": "adaLN-Zero",
                "seed": 100, "gflops": gflops, "params": 1, "data": {}, "train": {"global_batch": BATCH}})
        missing.append(rid)
    write_sweep_record(results / name, evaluated + missing, f"name: {name}\nmodels: [{', '.join(MODELS)}]\nseeds: [0]\n")
    return {"evaluated": evaluated, "missing": missing}


_RENDERED: dict[str, tuple[Path, dict, dict]] = {}


def rendered_partial_sweep(tmp_root: Path) -> tuple[Path, dict, dict]:
    """Render (once per test session) the report of a partial synthetic sweep with every figure kind.
    Returns (report folder, manifest, {"evaluated": [...], "missing": [...]})."""
    if "sweep" not in _RENDERED:
        from harness.report import render_sweep_report
        ids = write_sweep(tmp_root / "results", "synth", n_missing=2)
        manifest = render_sweep_report(tmp_root / "results", "synth", tmp_root / "reports", n_boot=60)
        _RENDERED["sweep"] = (tmp_root / "reports" / "synth", manifest, ids)
    return _RENDERED["sweep"]


def rendered_scaling_sweep(tmp_root: Path) -> tuple[Path, dict]:
    """Render (once per session) the report of write_scaling_sweep: (report folder, manifest)."""
    if "scaling" not in _RENDERED:
        from harness.report import render_sweep_report
        write_scaling_sweep(tmp_root / "results")
        manifest = render_sweep_report(tmp_root / "results", "scaling", tmp_root / "reports", n_boot=40)
        _RENDERED["scaling"] = (tmp_root / "reports" / "scaling", manifest)
    return _RENDERED["scaling"]


SCALING = {  # six models of one family: name -> (size, patch, depth, hidden, heads, gflops)
    "DiT-S/4": ("S", 4, 12, 384, 6, 0.05), "DiT-S/2": ("S", 2, 12, 384, 6, 0.2),
    "DiT-B/4": ("B", 4, 12, 768, 12, 0.2), "DiT-B/2": ("B", 2, 12, 768, 12, 0.8),
    "DiT-L/4": ("L", 4, 24, 1024, 16, 0.7), "DiT-L/2": ("L", 2, 24, 1024, 16, 2.8),
}


def write_scaling_sweep(results: Path, name: str = "scaling", seed: int = 0) -> list[str]:
    """results/<name>/ with six adaLN-Zero models of SCALING on the law of true_fid, four checkpoints
    each, and FID's bootstrap standard error in every record (as evaluation writes it)."""
    rng = np.random.default_rng(seed)
    saved = dict(MODELS)
    MODELS.update(SCALING)
    try:
        ids = [write_run(results / name / "runs", m, "adaLN-Zero", 0, rng, noise=0.01) for m in SCALING]
    finally:
        MODELS.clear()
        MODELS.update(saved)
    for rid in ids:  # params grow with hidden x depth, as a DiT's do
        path = results / name / "runs" / rid / "run.json"
        run = json.loads(path.read_text())
        run["params"] = int(run["depth"] * run["hidden"] ** 2 * 12)
        path.write_text(json.dumps(run))
        ev = results / name / "runs" / rid / "eval.jsonl"
        recs = [json.loads(line) for line in ev.read_text().splitlines()]
        ev.write_text("".join(json.dumps({**r, "fid_se": 0.02 * r["fid"]}) + "\n" for r in recs))
    return ids
