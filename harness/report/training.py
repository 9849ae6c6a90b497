"""The report's sections on how the runs trained: loss curves, every metric over training, real and
generated image grids, and what the study cost (from train.jsonl and eval.jsonl)."""
from __future__ import annotations

import logging
import numpy as np
import pandas as pd

from harness.config import layout
from harness.errors import HarnessError
from harness.report import curves as C
from harness.report import figures as F
from harness.report.render import FigureSpec, Report, Table
from harness.report.view import SweepView
from harness.training.runtime import train_tflops
from harness.data.datasets import open_dataset
from harness.sampling.sample import make_grid

log = logging.getLogger(__name__)

REAL_GRID_SIZE = 16  # images in the real-data grid, as many as the trainer's sample grids hold


def runs_by_gflops(runs: list[dict]) -> list[dict]:
    return sorted(runs, key=lambda r: (float(r.get("gflops") or 0), r.get("run_id", "")))


def loss_section(v: SweepView, rep: Report) -> None:
    if not any(("loss" in g and g["loss"].notna().any()) for g in v.res.train_logs.values()):
        return
    rep.figures.append(FigureSpec(
        "training_loss", "Training loss", "Each run's loss, mse and vb as train.jsonl logs them (the mean over "
        "each log interval): faint, every logged value; solid, an exponential moving average over a tenth of "
        "the run's log lines. Dash-dotted: the conditioning ablation's blocks. No bands: one loss per "
        "interval is logged, not its spread.", C.loss_curves(v.res.train_logs, v.res.runs), section="training"))


def metric_curves_section(v: SweepView, rep: Report) -> None:
    if v.main.empty:
        return
    bars = F.uncertainty_caption(v.main)
    for x, name, what in [("step", "metrics_vs_steps", "training steps"),
                          ("train_compute", "metrics_vs_compute", "training compute")]:
        rep.figures.append(FigureSpec(
            name, f"Every metric against {what}",
            f"FID, sFID, Inception Score, precision and recall at each evaluated checkpoint, one line per model "
            f"({v.cond}, default sampling setting, seed mean). {bars} The other metrics carry no recorded "
            "standard error.", C.metric_curves(v.default, x), section="training"))


def real_grid(run: dict) -> np.ndarray | None:
    """REAL_GRID_SIZE training images of the run's dataset, laid out and enlarged as the trainer's sample
    grids are (harness.sampling.sample.save_grid); classes in turn for the digits. None when the data is not here."""
    data = run.get("data") or {}
    try:
        ds = open_dataset(data.get("path") or data.get("dataset") or "", int(data.get("image_size") or 8),
                          channels=3)
    except (HarnessError, OSError, ValueError) as err:
        log.info("no real-data grid: %s", err)
        return None
    labels = getattr(ds, "labels", None)
    if labels is not None:  # the first images of each class in turn
        per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        idx = [per_class[k % len(per_class)][k // len(per_class)] for k in range(REAL_GRID_SIZE)]
    else:
        idx = np.linspace(0, len(ds) - 1, REAL_GRID_SIZE).astype(int).tolist()
    images = np.stack([((ds[i][0].numpy().transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255) for i in idx])
    images = images.astype(np.uint8)
    scale = max(1, 64 // images.shape[1])
    return make_grid(images.repeat(scale, axis=1).repeat(scale, axis=2))


def samples_section(v: SweepView, rep: Report) -> None:
    """The newest sample grid of each run, beside a grid of real training images."""
    grids: list = []
    for run in runs_by_gflops(v.res.runs):
        newest = layout.RunFolder(layout.run_dir(v.res.root.parent, v.res.name, run.get("run_id", ""))).newest_grid()
        if newest:
            step, path = newest
            grids.append((f"{run.get('model')}\n{run.get('conditioning')}, step {step:,}", path))
    if not grids:
        return
    real = real_grid(v.res.runs[0]) if v.res.runs else None
    where = ("First panel: real training images of the same dataset at the same size." if real is not None else
             "No real-data panel: the dataset is not readable from this machine.")
    if real is not None:
        grids.insert(0, ("real training images\n" + str((v.res.runs[0].get("data") or {}).get("dataset", "")), real))
    rep.figures.append(FigureSpec("samples", "Real images and samples",
                                  f"{where} Then the newest sample grid of each run (EMA weights, classes in turn).",
                                  F.sample_grids(grids), section="samples"))


def _devices(log_: pd.DataFrame, gflops: float | None) -> int:
    """Devices the run trained on: total TFLOP/s over TFLOP/s per device (1 when not logged)."""
    last = log_.dropna(subset=[c for c in ("images_per_s", "tflops_per_device") if c in log_]).tail(1)
    if not gflops or last.empty or "tflops_per_device" not in last or not last["tflops_per_device"].iloc[0]:
        return 1
    return max(1, int(round(train_tflops(gflops, float(last["images_per_s"].iloc[0]))
                            / float(last["tflops_per_device"].iloc[0]))))


def _hms(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "–"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def cost_rows(v: SweepView) -> list[dict]:
    """Per run: devices, training and evaluation wall time (s), device-hours, images/s and MFU."""
    out = []
    for run in runs_by_gflops(v.res.runs):
        rid = run.get("run_id", "")
        log_ = v.res.train_logs.get(rid)
        if log_ is None or "wall_s" not in log_:
            continue
        speed = v.res.throughput.get(rid) or {}
        train_s = float(log_["wall_s"].max())
        eval_s = float(v.frame.loc[v.frame["run_id"] == rid, "eval_wall_s"].sum())
        devices = _devices(log_, run.get("gflops"))
        out.append({"run_id": rid, "model": run.get("model", ""), "conditioning": run.get("conditioning", ""),
                    "devices": devices, "train_s": train_s, "eval_s": eval_s,
                    "device_hours": devices * (train_s + eval_s) / 3600,
                    "images_per_s": speed.get("images_per_s"), "mfu": speed.get("mfu")})
    return out


def cost_section(v: SweepView, rep: Report) -> None:
    rows = cost_rows(v)
    if not rows:
        return
    table = [[r["model"], r["conditioning"], str(r["devices"]), _hms(r["train_s"]), _hms(r["eval_s"]),
              f"{r['device_hours']:.3g}", "–" if r["images_per_s"] is None else f"{r['images_per_s']:.4g}",
              "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"] for r in rows]
    total = sum(r["device_hours"] for r in rows)
    wall = sum(r["train_s"] + r["eval_s"] for r in rows)
    table.append(["all runs", "", "", _hms(sum(r["train_s"] for r in rows)), _hms(sum(r["eval_s"] for r in rows)),
                  f"{total:.3g}", "", ""])
    rep.tables.append(Table(
        "What the study cost", ["model", "conditioning", "devices", "training wall", "evaluation wall",
                                "device-hours", "images/s", "MFU"], table,
        "Wall times (h:mm:ss) from train.jsonl (training, to the last log line) and eval.jsonl (sampling and "
        "metrics); device-hours = devices × (training + evaluation wall). Devices: accelerators, or one "
        "process on a CPU. images/s and MFU: medians after the first log line; MFU is '–' where the device's "
        f"peak is unknown (CPUs). Runs one after another would take {_hms(wall)} of wall time in all.",
        section="cost"))
    rep.notes.append(f"The study cost {total:.3g} device-hours over {len(rows)} runs.")
