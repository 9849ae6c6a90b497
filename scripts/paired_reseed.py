"""Does the paired standard error predict how FID_a - FID_b moves when the noise is drawn afresh? The mini
study's final checkpoints, DDIM against DPM-Solver++ (the README's table), re-sampled with K new noise seeds.

  python scripts/paired_reseed.py --results results --seeds 5 [--sampler ddim] [--out FILE.json]
  python scripts/paired_reseed.py --results results --judge ddim.json dpm.json

Sampling writes, per sampler, the FID of every (run, sampling steps, seed) as JSON; --judge joins two such files
with the sweeps' records (mini-sampler-ddim, mini-sampler-dpm) and prints the judgement.

The rule, written before the first run: per cell (run, sampling steps), d_s = FID_ddim - FID_dpm at the K fresh
seeds; z_s = (d_s - mean_s d) / se_paired, se_paired the cell's recorded-seed paired error (scripts/paired_table.py,
20 resamples). If se_paired is the right scale, V = sum z^2 / (cells x (K - 1)) is about 1; with ~19 degrees of
freedom in each se_paired, E[V] is about 19 / 17 = 1.12. Consistent when V lies in the 99% chi-square interval of
cells x (K - 1) degrees of freedom, widened by that 1.12 on the upper side. The same V with the combined error
shows how far the combined one overstates.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

from harness.config import layout
from harness.metrics import get_feature_extractor, load_reference
from harness.metrics.stats import frechet_distance, gaussian_stats
from harness.models.runmodel import model_from_checkpoint
from harness.report.paired import PairedErrors
from harness.sampling.sample import balanced_labels, sample_images
from harness.study import analysis
from harness.study.results import load_sweep

STEP, STEPS, N, FIRST_SEED = 2000, (5, 10, 25), 1000, 10_000   # fresh seeds: FIRST_SEED, FIRST_SEED + 1, ...


def sample_fids(results: Path, sampler: str, seeds: int) -> list[dict]:
    extractor = get_feature_extractor("digits", device="cpu")
    ref = load_reference("digits", extractor, image_size=8)
    out = []
    for rid in sorted({str(r) for r in load_sweep(results, "mini-sampler-ddim").frame["run_id"]}):
        model, run, _ = model_from_checkpoint(layout.RunFolder(layout.run_dir(results, "mini", rid)).checkpoint(STEP))
        for k in STEPS:
            for s in range(FIRST_SEED, FIRST_SEED + seeds):
                images = sample_images(model, run, balanced_labels(N, 10), sampling_steps=k, sampler=sampler,
                                       seed=s, batch_size=500, guidance_channels="all", cfg_scale=1.0)
                fid = frechet_distance(*gaussian_stats(extractor.extract(images, 500).pool), ref.mu, ref.sigma)
                out.append({"run_id": rid, "sampling_steps": k, "seed": s, "fid": fid})
                print(json.dumps(out[-1]), flush=True)
    return out


def judge(results: Path, ddim: list[dict], dpm: list[dict]) -> dict:
    fa, fb = (load_sweep(results, n).frame for n in ("mini-sampler-ddim", "mini-sampler-dpm"))
    errors = PairedErrors({})
    key = ["run_id", "step", "sampling_steps", "cfg_scale"]
    both = fa.merge(fb, on=key, suffixes=("_a", "_b"))
    z_paired, z_combined, cells = [], [], 0
    b_fid = {(r["run_id"], r["sampling_steps"], r["seed"]): r["fid"] for r in dpm}
    for _, row in both.iterrows():
        a = {**{k[:-2]: v for k, v in row.items() if k.endswith("_a")}, **{k: row[k] for k in key}}
        b = {**{k[:-2]: v for k, v in row.items() if k.endswith("_b")}, **{k: row[k] for k in key}}
        paired = analysis.verdict(a, b, errors)
        combined = float(np.hypot(a["fid_se"], b["fid_se"]))
        d = np.array([r["fid"] - b_fid[r["run_id"], r["sampling_steps"], r["seed"]] for r in ddim
                      if r["run_id"] == row["run_id"] and r["sampling_steps"] == row["sampling_steps"]])
        if len(d) < 2 or not paired.paired:
            continue
        cells += 1
        z_paired += list((d - d.mean()) / paired.se)
        z_combined += list((d - d.mean()) / combined)
    dof = len(z_paired) - cells
    lo, hi = stats.chi2.ppf([0.005, 0.995], dof) / dof
    v_paired, v_combined = float(np.sum(np.square(z_paired)) / dof), float(np.sum(np.square(z_combined)) / dof)
    return {"cells": cells, "dof": dof, "V_paired": v_paired, "V_combined": v_combined,
            "accept": [float(lo), float(hi * 19 / 17)], "consistent": bool(lo <= v_paired <= hi * 19 / 17)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", type=Path)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sampler", choices=("ddim", "dpm-solver++"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--judge", nargs=2, type=Path, metavar=("DDIM_JSON", "DPM_JSON"))
    args = parser.parse_args()
    if args.judge:
        ddim, dpm = (json.loads(p.read_text()) for p in args.judge)
        print(json.dumps(judge(args.results, ddim, dpm)))
        return
    fids = sample_fids(args.results, args.sampler, args.seeds)
    if args.out:
        args.out.write_text(json.dumps(fids))


if __name__ == "__main__":
    main()
