"""The paper's published numbers (Peebles & Xie 2023), shipped as data: the one home for them.

table4.csv: Table 4 (12 variants with adaLN-Zero at 400K steps, the conditioning ablation on
DiT-XL/2, long XL/2 runs). `gflops` counts one fused multiply-add as one flop, for one image,
transformer only. headline.csv: Tables 2-3 (DiT-XL/2, 250 DDPM steps, with and without guidance).
"""
from __future__ import annotations

import csv
from importlib import resources

PAPER_CORRELATION_LOG_GFLOPS_FID = -0.93  # the figure quoted in the paper (Pearson on log Gflops)
PAPER_GLOBAL_BATCH = 256
TRAIN_PASSES = 3  # a training step costs ~3 forward passes (forward + a backward twice as costly)


def train_compute(gflops: float, global_batch: int, steps: int) -> float:
    """Training compute in Gflops as the paper defines it: model Gflops x batch x steps x 3."""
    return float(gflops) * float(global_batch) * float(steps) * TRAIN_PASSES


def _read(name: str) -> list[dict]:
    text = resources.files(__package__).joinpath(name).read_text()
    rows = list(csv.DictReader(text.splitlines()))
    for row in rows:
        for k, v in row.items():
            try:
                row[k] = int(v)
            except ValueError:
                try:
                    row[k] = float(v)
                except ValueError:
                    pass
    return rows


def table4() -> list[dict]:
    """All rows of Table 4 as dicts (model, size, patch, depth, hidden, heads, conditioning,
    image_size, gflops, params_m, train_steps, fid50k)."""
    return _read("table4.csv")


def headline() -> list[dict]:
    """Tables 2-3: DiT-XL/2 FID-50K, sFID, IS, precision, recall at cfg 1.0/1.25/1.5."""
    return _read("headline.csv")


def paper_gflops(model: str, conditioning: str = "adaLN-Zero", image_size: int = 256) -> float | None:
    """The paper's Gflops for (model, conditioning, image size), or None when it has no such row."""
    for row in table4():
        if (row["model"], row["conditioning"], row["image_size"]) == (model, conditioning, image_size):
            return float(row["gflops"])
    return None
