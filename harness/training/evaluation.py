"""A run's evaluation protocol on disk: which settings it asks for, which eval.jsonl holds, and which
ADM npz files of those settings eval.keep_samples keeps.

The one home for "is this evaluation recorded?", shared by the trainer (what to evaluate next), the
dispatcher (is a run complete?) and `harness status`, so it imports no torch; the sampling itself is
`harness.training.evaluator`.

No step of the protocol reads an evaluation's npz back: the metrics come from the features gathered while
sampling, and pending settings are told by eval.jsonl alone (`harness evaluate --samples` reads one when
asked to, and names eval.keep_samples when it was not kept). So `none` never writes the file and `last`
writes it only for a step at least as high as every recorded one; a file goes only after eval.jsonl holds
its own record and that record is durable (`io.remove_after`). A kill between the two leaves an extra file,
which the next evaluation, or the run's restart (`pending_evals`), removes.
"""
from __future__ import annotations

import logging
from pathlib import Path

from harness.io import read_jsonl, remove_after
from harness.config.layout import SETTING_KEYS, RunFolder
from harness.config.spec import RunSpec

log = logging.getLogger(__name__)

#: seed tag of evaluation sampling (training uses 1 for epochs and 2 for steps; see harness.training.train)
TAG_EVAL = 3


def setting_key(record: dict) -> tuple:
    """What makes two records the same measurement: their SETTING_KEYS (named with the results folder's files)."""
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


def _last_step(records: list[dict]) -> int:
    return max((int(r["step"]) for r in records if isinstance(r.get("step"), int)), default=-1)


def writes_samples(run: RunSpec, run_dir: str | Path, step: int) -> bool:
    """Whether evaluating `step` writes its npz files: `all` yes, `none` no, `last` unless eval.jsonl
    already holds a later step (an earlier step evaluated late, from a retained checkpoint, is never last)."""
    keep = run.eval.keep_samples
    if keep != "last":
        return keep == "all"
    return step >= _last_step(list(read_jsonl(RunFolder(Path(run_dir)).eval_log)))


def unkept_samples(run: RunSpec, run_dir: str | Path) -> list[Path]:
    """The npz files eval.keep_samples does not keep and whose own record eval.jsonl holds (`RunFolder.samples_owners`:
    a legacy name's when a record of its step, sampling steps and cfg scale has no file of its own): under `none`
    every such file, under `last` those of steps before the highest recorded step, under `all` none."""
    keep = run.eval.keep_samples
    if keep == "all":
        return []
    folder = RunFolder(Path(run_dir))
    records = list(read_jsonl(folder.eval_log))
    recorded, last = folder.samples_owners(records), _last_step(records)
    return [p for s, p in folder.samples_files() if p.name in recorded and (keep == "none" or s < last)]


def prune_samples(run: RunSpec, run_dir: str | Path) -> list[Path]:
    """Delete `unkept_samples` once eval.jsonl, whose records replace them, is durable. Returns the paths removed."""
    paths = unkept_samples(run, run_dir)
    removed = remove_after(RunFolder(Path(run_dir)).eval_log, paths,
                           f"eval.keep_samples: {run.eval.keep_samples}; the run's next evaluation tries again")
    if removed:
        log.info("eval.keep_samples: %s removed %s", run.eval.keep_samples, ", ".join(p.name for p in removed))
    return removed
