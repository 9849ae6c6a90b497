"""Any scaling table as forecast points: a CSV with one row per model, and the paper's Table 4 read
through the same path.

Columns (header names; order free; other columns ignored):
  name                 model name, unique                                   required
  fid                  FID, positive                                        required
  steps | images_seen  training length, the same in every row               one of them required
  params               parameter count                                      two-factor law
  tokens | input_size, patch   tokens per image, or the transformer's input side and patch
                       (tokens = (input_size / patch)^2)                    two-factor law
  gflops               forward Gflops of one image                          saturating and power laws
  fid_se, size         FID standard error; a size label (for size:S hold-outs)  optional
An empty optional cell is missing; a law that needs a missing column says which.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from harness.errors import HarnessError
from harness.paper import table4

NUMBERS = ("fid", "steps", "images_seen", "params", "tokens", "input_size", "patch", "gflops", "fid_se")
POSITIVE = ("fid", "steps", "images_seen", "params", "tokens", "input_size", "patch", "gflops")


def _number(where: str, row: int, name: str, col: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise HarnessError(f"{where}: row {row} ({name}), column {col}: {text!r} is not a number; write a plain "
                           "number such as 23.01 (no units or thousands separators)") from None
    if not np.isfinite(v) or (col in POSITIVE and v <= 0) or v < 0:
        raise HarnessError(f"{where}: row {row} ({name}), column {col}: {text} must be "
                           f"{'positive' if col in POSITIVE else 'zero or more'}")
    return v


def points_from_rows(rows: list[dict], where: str) -> pd.DataFrame:
    """Validated forecast points (name, run_id, size, patch, compute, params, tokens, fid, fid_se, steps)
    from CSV-like rows of strings or numbers; `where` names the source in errors."""
    cols = set().union(*(r.keys() for r in rows)) if rows else set()
    missing = [c for c in ("name", "fid") if c not in cols]
    if not cols & {"steps", "images_seen"}:
        missing.append("steps (or images_seen)")
    if missing or not rows:
        raise HarnessError(f"{where}: missing column {', '.join(missing) or 'rows'}; a forecast table needs name, fid, "
                           "steps or images_seen, and params + tokens (or input_size + patch) and/or gflops")
    out, seen = [], {}
    for i, r in enumerate(rows, start=2):   # row 1 is the header
        name = str(r.get("name") or "").strip()
        if not name:
            raise HarnessError(f"{where}: row {i}: column name is empty; give every model a name")
        if name in seen:
            raise HarnessError(f"{where}: name {name} appears in rows {seen[name]} and {i}; list each model once "
                               "(average its seeds, or give each run its own name)")
        seen[name] = i
        v = {c: (np.nan if str(r.get(c, "")).strip() == "" else _number(where, i, name, c, str(r[c]).strip()))
             for c in NUMBERS}
        if np.isnan(v["fid"]):
            raise HarnessError(f"{where}: row {i} ({name}), column fid is empty; every row needs its FID")
        length = v["steps"] if np.isfinite(v["steps"]) else v["images_seen"]
        if np.isnan(length):
            raise HarnessError(f"{where}: row {i} ({name}): steps and images_seen are both empty; give one")
        tokens = v["tokens"] if np.isfinite(v["tokens"]) else (v["input_size"] / v["patch"]) ** 2
        out.append({"name": name, "run_id": name, "size": str(r.get("size") or "").strip() or np.nan,
                    "patch": v["patch"], "compute": v["gflops"], "params": v["params"], "tokens": tokens,
                    "fid": v["fid"], "fid_se": v["fid_se"], "length": length})
    points = pd.DataFrame(out)
    if points["length"].nunique() > 1:
        raise HarnessError(f"{where}: columns steps/images_seen: the rows were trained for different lengths "
                           f"({', '.join(f'{x:g}' for x in sorted(points['length'].unique()))}); the laws compare "
                           "models at one training length, so keep the rows of one")
    if points["patch"].notna().all():
        points["patch"] = points["patch"].astype(int)
    order = points["compute"] if points["compute"].notna().all() else points["params"]
    return points.drop(columns="length").iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)


def table_points(path: str | Path) -> pd.DataFrame:
    """Forecast points from a CSV file (module docstring); HarnessError naming the file on any problem."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [{(k or "").strip().lower(): v for k, v in r.items()} for r in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise HarnessError(f"--table {path}: cannot be read as a CSV ({err}); give a UTF-8 CSV with a header row") \
            from None
    return points_from_rows(rows, f"--table {path}")


def paper_table() -> pd.DataFrame:
    """Table 4's 12 adaLN-Zero models at 256px and 400K steps in the forecast table's columns (the
    transformer's input is the 32x32 SD-VAE latent)."""
    rows = [r for r in table4() if r["conditioning"] == "adaLN-Zero" and r["image_size"] == 256
            and r["train_steps"] == 400000]
    return pd.DataFrame({"name": [r["model"] for r in rows], "size": [r["size"] for r in rows],
                         "params": [r["params_m"] * 1e6 for r in rows], "gflops": [float(r["gflops"]) for r in rows],
                         "input_size": [r["image_size"] // 8 for r in rows], "patch": [r["patch"] for r in rows],
                         "steps": [r["train_steps"] for r in rows], "fid": [float(r["fid50k"]) for r in rows]})


def paper_points() -> pd.DataFrame:
    """Table 4 as forecast points, through the same path as `--table`."""
    return points_from_rows(paper_table().to_dict("records"), "Table 4")
