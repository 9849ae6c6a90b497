"""A run's evaluation protocol on disk: which settings it asks for and which eval.jsonl holds.

The one home for "is this evaluation recorded?", shared by the trainer (what to evaluate next) and
the dispatcher (is a run complete?), and evaluation at training steps: sampling with the EMA model,
metrics, eval.jsonl. torch is imported inside the functions that sample, so `harness status` stays fast.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.io import append_jsonl, read_jsonl

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: seed tag of evaluation sampling (training uses 1 for epochs and 2 for steps; see harness.train)
TAG_EVAL = 3

# the fields that make two eval records the same measurement
SETTING_KEYS = ("step", "num_samples", "sampling_steps", "sampler", "cfg_scale", "guidance_channels",
                "feature_space", "reference")


def setting_key(record: dict) -> tuple:
    return tuple(str(record.get(k)) for k in SETTING_KEYS)


def eval_settings(run: Any, step: int) -> list[dict]:
    """The settings `run.eval` asks for at `step`: one per (sampling_steps, cfg_scale)."""
    ev = run.eval
    return [{"step": step, "num_samples": ev.num_samples, "sampling_steps": int(k), "sampler": ev.sampler,
             "cfg_scale": float(c), "guidance_channels": ev.guidance_channels, "feature_space": ev.features,
             "reference": ev.reference} for k in ev.sampling_steps for c in ev.cfg_scales]


def missing_settings(run: Any, run_dir: str | Path, step: int) -> list[dict]:
    """The settings of `step` not yet in eval.jsonl (so a rerun never duplicates a record)."""
    done = {setting_key(r) for r in read_jsonl(Path(run_dir) / "eval.jsonl")}
    return [s for s in eval_settings(run, step) if setting_key(s) not in done]


def eval_progress(run: Any, run_dir: str | Path) -> tuple[int, int]:
    """(settings recorded, settings asked for) over all of eval.at_steps."""
    done = {setting_key(r) for r in read_jsonl(Path(run_dir) / "eval.jsonl")}
    want = [setting_key(s) for step in run.eval.at_steps for s in eval_settings(run, step)]
    return sum(k in done for k in want), len(want)


# ----------------------------------------------------------------------------- evaluation at training steps
def save_grid(run: Any, run_dir: Path, ema: torch.nn.Module, device: torch.device, step: int,
               n: int = 16) -> Path | None:
    """A grid of `n` class-balanced EMA samples: samples/grid_step_XXXXXXX.png."""
    from harness.runtime import derive_seed
    from harness.sample import balanced_labels, sample_images, save_grid

    ev = run.eval
    labels = balanced_labels(n, run.data.num_classes)
    images = sample_images(ema, run, labels, sampling_steps=min(ev.sampling_steps), sampler=ev.sampler,
                           cfg_scale=max(ev.cfg_scales), guidance_channels=ev.guidance_channels,
                           seed=derive_seed(run.seed, TAG_EVAL, step), device=device)
    path = run_dir / "samples" / f"grid_step_{step:07d}.png"
    save_grid(images, path)
    return path


def evaluate_step(run: Any, run_dir: str | Path, ema: torch.nn.Module, device: torch.device, step: int) -> int:
    """Sample eval.num_samples class-balanced images per missing (sampling_steps, cfg_scale) with the
    EMA model, compute eval.metrics in eval.features space against eval.reference, append eval.jsonl.
    Returns the number of records appended."""
    from harness.metrics import compute_metrics, get_feature_extractor, load_reference
    from harness.runtime import derive_seed
    from harness.sample import balanced_labels, sample_images, save_npz
    from harness.samplers import model_evaluations, provenance

    run_dir = Path(run_dir)
    todo = missing_settings(run, run_dir, step)
    if not todo:
        return 0
    ev = run.eval
    extractor = (get_feature_extractor(ev.features, weights=ev.resolved_inception_weights(), device=device)
                 if ev.features == "inception" else get_feature_extractor(ev.features, device=device))
    reference = load_reference(ev.resolved_reference(), extractor, image_size=run.data.image_size,
                               batch_size=ev.batch_size)
    for setting in todo:
        t0 = time.perf_counter()
        labels = balanced_labels(ev.num_samples, run.data.num_classes)
        images = sample_images(ema, run, labels, sampling_steps=setting["sampling_steps"], sampler=ev.sampler,
                               cfg_scale=setting["cfg_scale"], guidance_channels=ev.guidance_channels,
                               seed=derive_seed(run.seed, TAG_EVAL, step, setting["sampling_steps"]),
                               device=device, batch_size=ev.batch_size)
        name = f"samples_step_{step:07d}_k{setting['sampling_steps']}_cfg{setting['cfg_scale']:g}.npz"
        save_npz(images, labels, run_dir / "samples" / name)
        metrics = compute_metrics(images, reference, extractor, list(ev.metrics), ev.batch_size)
        rec = dict(setting, model_evaluations=model_evaluations(ev.sampler, setting["sampling_steps"]),
                   **provenance(ev.sampler))
        for key in ("fid", "sfid", "inception_score", "precision", "recall"):
            rec[key] = metrics.get(key)
        # the requested space stays in `feature_space` (the setting's key); the network that
        # computed the numbers ("inception" only for the official FID weights) in `features_id`
        rec["features_id"] = metrics.get("feature_space", extractor.name)
        rec.update(wall_s=time.perf_counter() - t0, time=time.time())
        append_jsonl(run_dir / "eval.jsonl", rec)
        log.info("eval step %d %s", step, {k: rec[k] for k in ("sampling_steps", "cfg_scale", "fid")})
    return len(todo)


def pending_evals(run: Any, run_dir: Path, ema_now: torch.nn.Module, device: torch.device,
                   upto: int, current: int) -> None:
    """Evaluate eval steps <= `upto` whose records are missing, from their retained checkpoints."""
    from harness import checkpoint as ckpt

    for s in sorted(int(x) for x in run.eval.at_steps):
        if s > upto or not missing_settings(run, run_dir, s):
            continue
        if s == current:
            evaluate_step(run, run_dir, ema_now, device, s)
            continue
        path = ckpt.checkpoint_path(run_dir / "checkpoints", s)
        if not path.exists():
            log.warning("eval step %d has no retained checkpoint; its evaluation is skipped", s)
            continue
        ema = copy.deepcopy(ema_now)
        ema.load_state_dict(ckpt.load_checkpoint(path)["ema"])
        evaluate_step(run, run_dir, ema, device, s)
