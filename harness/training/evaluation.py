"""A run's evaluation protocol on disk: which settings it asks for and which eval.jsonl holds.

The one home for "is this evaluation recorded?", shared by the trainer (what to evaluate next), the
dispatcher (is a run complete?) and `harness status`, so it imports no torch; the sampling itself is
`harness.training.evaluator`.
"""
from __future__ import annotations

from pathlib import Path

from harness.io import read_jsonl
from harness.config.layout import RunFolder
from harness.config.spec import RunSpec

#: seed tag of evaluation sampling (training uses 1 for epochs and 2 for steps; see harness.training.train)
TAG_EVAL = 3

# the fields that make two eval records the same measurement
SETTING_KEYS = ("step", "num_samples", "sampling_steps", "sampler", "cfg_scale", "guidance_channels",
                "feature_space", "reference")


def setting_key(record: dict) -> tuple:
    return tuple(str(record.get(k)) for k in SETTING_KEYS)


def eval_settings(run: RunSpec, step: int) -> list[dict]:
    """The settings `run.eval` asks for at `step`: one per (sampling_steps, cfg_scale)."""
    ev = run.eval
    return [{"step": step, "num_samples": ev.num_samples, "sampling_steps": int(k), "sampler": ev.sampler,
             "cfg_scale": float(c), "guidance_channels": ev.guidance_channels, "feature_space": ev.features,
             "reference": ev.reference} for k in ev.sampling_steps for c in ev.cfg_scales]


def missing_settings(run: RunSpec, run_dir: str | Path, step: int) -> list[dict]:
    """The settings of `step` not yet in eval.jsonl (so a rerun never duplicates a record)."""
    done = {setting_key(r) for r in read_jsonl(RunFolder(Path(run_dir)).eval_log)}
    return [s for s in eval_settings(run, step) if setting_key(s) not in done]


def eval_progress(run: RunSpec, run_dir: str | Path) -> tuple[int, int]:
    """(settings recorded, settings asked for) over all of eval.at_steps."""
    done = {setting_key(r) for r in read_jsonl(RunFolder(Path(run_dir)).eval_log)}
    want = [setting_key(s) for step in run.eval.at_steps for s in eval_settings(run, step)]
    return sum(k in done for k in want), len(want)
