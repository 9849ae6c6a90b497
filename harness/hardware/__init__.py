"""Throughputs measured per GPU kind, packaged, so `harness plan` speaks in hours without flags.

`throughput.csv`: one row per (gpu, model) measured with `harness bench` at the paper's geometry
(256 px through the SD VAE: 32x32x4 latents, 1000 classes, adaLN-Zero): training images/s in the best
configuration measured, and, where measured, sampling images/s for ONE denoising step on the path
evaluation takes (its configuration says which) and `eval_ms_per_image`, what each evaluated image costs
beyond the network (noise, VAE decode, feature network: the same for every model at this geometry). A model or geometry not in the table is scaled from
the nearest measured model by Gflops (`harness.cost.plan`). New measurements replace rows here; a user's own
`harness bench --suite ... --out FILE.json` overrides the table with `harness plan --throughput-from`.
Torch-free: read by `harness plan`.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources

from harness.errors import HarnessError

DEFAULT_GPU = "h100"
#: the geometry every row was measured at: (latent side, latent channels, classes)
GEOMETRY = (32, 4, 1000)


@dataclass(frozen=True)
class Measured:
    gpu: str
    model: str
    train_images_per_s: float
    train_config: str
    sample_images_per_s_one_step: float | None
    sample_config: str
    measured: str
    source: str
    eval_ms_per_image: float | None = None  # evaluation's noise, decode and features per image (any model)


def _rows() -> list[Measured]:
    text = resources.files(__package__).joinpath("throughput.csv").read_text()
    out = []
    for r in csv.DictReader(text.splitlines()):
        sample, per_image = r["sample_images_per_s_one_step"], r.get("eval_ms_per_image")
        out.append(Measured(r["gpu"], r["model"], float(r["train_images_per_s"]), r["train_config"],
                            float(sample) if sample else None, r["sample_config"], r["measured"], r["source"],
                            float(per_image) if per_image else None))
    return out


def gpus() -> list[str]:
    """The GPU kinds the table has figures for."""
    return sorted({m.gpu for m in _rows()})


def measured(gpu: str) -> list[Measured]:
    """The table's rows for one GPU kind; HarnessError naming the kinds it has otherwise."""
    rows = [m for m in _rows() if m.gpu == gpu.lower()]
    if not rows:
        raise HarnessError(f"--gpu {gpu}: no packaged throughputs for this GPU kind (have: {', '.join(gpus())}). "
                           "Fix: measure your own with `harness bench --suite paper --out bench.json` and pass "
                           "--throughput-from bench.json.")
    return rows
