"""A loaded sweep filtered once (`SweepView`): what every section of the sweep report reads."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from harness.paper import table4
from harness.report.paired import PairedErrors
from harness.study import analysis
from harness.study.results import SweepResults, default_setting, main_conditioning


def paper_setup_matches(frame: pd.DataFrame) -> bool:
    """The paper's numbers are a valid reference only for its protocol: official Inception features,
    256px ImageNet (1000 classes, not the digits study), FID-50K without guidance."""
    return bool(len(frame)) and bool(
        (frame["feature_space"] == "inception").all() and (frame["image_size"] == 256).all()
        and (frame["num_classes"] == 1000).all() and (frame["dataset"] != "digits").all()
        and (frame["num_samples"] == 50000).all() and (frame["cfg_scale"].astype(float) == 1.0).all())


def _paper_400k(conditioning: str = "adaLN-Zero") -> list[dict]:
    return [r for r in table4() if r["image_size"] == 256 and r["train_steps"] == 400000
            and r["conditioning"] == conditioning]


@dataclass
class SweepView:
    """A loaded sweep, filtered once: every section of the report reads these frames.

    frame: every evaluation record (the CSV, the provenance table, the sampling-compute study);
    default: the records of the default evaluation setting (`results.default_setting`, applied once
    here); main: the default records of the main conditioning block `cond`; models: one row per
    model of `main` at `step` (seed mean); corrs: metric-vs-Gflops correlations at that step; paired_se: the
    paired standard error of two rows' FID difference where their records allow it (harness.report.paired).
    """

    res: SweepResults
    frame: pd.DataFrame
    default: pd.DataFrame
    cond: str
    main: pd.DataFrame
    models: pd.DataFrame
    step: int
    corrs: list
    paper_rows: list[dict] | None  # the paper's 400K-step rows, when its setup matches this sweep's
    paired_se: PairedErrors        # the paired error of two FIDs' difference, for the verdicts
    findings: list[list[str]] = field(default_factory=list)  # [finding, value, interval, resolved?, figure]

    @property
    def fid_corr(self):
        return next((c for c in self.corrs if c.metric == "fid"), None)


def sweep_view(res: SweepResults) -> SweepView:
    frame = res.frame
    default = default_setting(frame)
    cond = main_conditioning(default)
    main = default[default["conditioning"] == cond]
    models, step = analysis.per_model(main)
    return SweepView(res=res, frame=frame, default=default, cond=cond, main=main, models=models, step=step,
                     corrs=analysis.correlations(main, step),
                     paper_rows=_paper_400k() if paper_setup_matches(frame) else None,
                     paired_se=PairedErrors({str(r.get("run_id")): r for r in res.runs}))
