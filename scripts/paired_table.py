"""Two sweeps' FIDs of the same runs, setting by setting, with the combined and the paired verdict (README's
DDIM vs DPM-Solver++ table).

  python scripts/paired_table.py --results results mini-sampler-ddim mini-sampler-dpm

Rows: each run and evaluation (step, sampling steps, guidance) both sweeps recorded. A verdict names the sweep
with the lower FID where |FID_a - FID_b| > 1.645 x the error of the difference: the two errors combined, or the
paired one (harness.metrics.stats' rule) where the records prove the samples paired and stored their features.
"""
from __future__ import annotations

import argparse

import numpy as np

from harness.report.paired import PairedErrors
from harness.study import analysis
from harness.study.results import load_sweep

KEYS = ["run_id", "step", "sampling_steps", "cfg_scale"]


def _winner(v: analysis.Verdict, fa: float, fb: float, a: str, b: str) -> str:
    return (a if fa < fb else b) if v.status == "resolved" else "not resolved"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("sweep_a")
    parser.add_argument("sweep_b")
    args = parser.parse_args()
    ra, rb = load_sweep(args.results, args.sweep_a), load_sweep(args.results, args.sweep_b)
    errors = PairedErrors({str(r["run_id"]): r for r in ra.runs + rb.runs})
    both = ra.frame.merge(rb.frame, on=KEYS, suffixes=("_a", "_b"))
    print(f"| model | NFE | {args.sweep_a} FID | {args.sweep_b} FID | combined verdict | paired verdict | "
          "paired / combined SE |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ratios = []
    for _, row in both.sort_values(["gflops_a", "model_a", "model_evaluations_a"]).iterrows():
        a, b = _pair(row)
        combined, paired = analysis.verdict(a, b), analysis.verdict(a, b, errors)
        if paired.paired:
            ratios.append(paired.se / combined.se)
        names = (args.sweep_a, args.sweep_b)
        print(f"| {a['model']} | {int(a['model_evaluations'])} | {a['fid']:.2f} ± {a['fid_se']:.2f} | "
              f"{b['fid']:.2f} ± {b['fid_se']:.2f} | {_winner(combined, a['fid'], b['fid'], *names)} | "
              + (f"{_winner(paired, a['fid'], b['fid'], *names)} | {paired.se / combined.se:.2f} |" if paired.paired
                 else "– | – |"))
    print(f"\n{errors.note()}")
    if ratios:
        print(f"paired / combined SE: median {np.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}; "
              f"{errors.n_boot} resamples each")


def _pair(row) -> tuple[dict, dict]:
    """The merged row's two records, each with the shared keys."""
    shared = {k: row[k] for k in KEYS}
    return tuple({**{k[:-2]: v for k, v in row.items() if k.endswith(s)}, **shared} for s in ("_a", "_b"))


if __name__ == "__main__":
    main()
