"""A run's evaluation protocol on disk: which settings it asks for and which eval.jsonl holds.

The one home for "is this evaluation recorded?", shared by the trainer (what to evaluate next) and
the dispatcher (is a run complete?), and evaluation at training steps: sampling with the EMA model,
sharded over every rank, metrics, eval.jsonl. torch is imported inside the functions that sample, so `harness status` stays fast.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.io import append_jsonl, read_jsonl
from harness.config.layout import RunFolder
from harness.config.spec import RunSpec

if TYPE_CHECKING:
    import torch

    from harness.training.runtime import Dist

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------- evaluation at training steps
# Called by EVERY rank with the same (identical) EMA model. The samples are cut into global batches of
# eval.batch_size; batch b is sampled (and its features computed) by rank b mod world, so each image,
# and each feature row, is computed from exactly the same inputs and batch whatever the number of ranks.
# Rank 0 takes every decision (what to evaluate), gathers the batches and writes the records.
# (Rank 0 gathers the images too, for the ADM npz: at 256 px, 50K samples are 9.8 GB of host memory.)
def save_grid(run: RunSpec, run_dir: Path, ema: torch.nn.Module, dist: Dist, step: int, n: int = 16) -> Path | None:
    """Rank 0: a grid of `n` class-balanced EMA samples, samples/grid_step_XXXXXXX.png (others: None)."""
    from harness.training.runtime import derive_seed  # torch: status imports this module to count owed evaluations
    from harness.sampling.sample import balanced_labels, sample_images, save_grid

    if not dist.main:
        return None
    ev = run.eval
    labels = balanced_labels(n, run.data.num_classes)
    images = sample_images(ema, run, labels, sampling_steps=min(ev.sampling_steps), sampler=ev.sampler,
                           cfg_scale=max(ev.cfg_scales), guidance_channels=ev.guidance_channels,
                           seed=derive_seed(run.seed, TAG_EVAL, step), device=dist.device)
    path = RunFolder(run_dir).grid(step)
    save_grid(images, path)
    return path


def _sample_batch(run: RunSpec, ema: torch.nn.Module, dist: Dist, setting: dict, extractor: Any, step: int,
                  first: int) -> tuple[int, np.ndarray, np.ndarray, Any]:
    """Global batch starting at sample `first`: (first, uint8 images (B, H, W, 3), labels (B,),
    Features of the B images)."""
    from harness.training.runtime import derive_seed  # torch: status imports this module to count owed evaluations
    from harness.sampling.sample import balanced_labels, sample_images

    ev = run.eval
    y = balanced_labels(ev.num_samples, run.data.num_classes)[first : first + ev.batch_size]
    images = sample_images(ema, run, y, sampling_steps=setting["sampling_steps"], sampler=ev.sampler,
                           cfg_scale=setting["cfg_scale"], guidance_channels=ev.guidance_channels,
                           seed=derive_seed(run.seed, TAG_EVAL, step, setting["sampling_steps"]),
                           device=dist.device, batch_size=ev.batch_size, first_index=first)
    return first, images, y.numpy(), extractor.extract(images, ev.batch_size)


def evaluate_step(run: RunSpec, run_dir: str | Path, ema: torch.nn.Module, dist: Dist, step: int) -> int:
    """All ranks: sample eval.num_samples class-balanced images per missing (sampling_steps, cfg_scale)
    with the EMA model, sharded over the ranks; rank 0 computes eval.metrics in eval.features space
    against eval.reference from the gathered features, writes the ADM npz and appends eval.jsonl.
    Returns the number of records appended (on every rank). No rank waits for another longer than
    runtime.COLLECTIVE_TIMEOUT."""
    # torch: status imports this module to count owed evaluations
    from harness.metrics import Features, get_feature_extractor, load_reference, metrics_from_features
    from harness.training.runtime import COLLECTIVE_TIMEOUT, bounded_barrier, broadcast_from_main, gather_to_main
    from harness.sampling.sample import save_npz
    from harness.sampling.samplers import model_evaluations, provenance

    run_dir = Path(run_dir)
    what = f"evaluation of step {step}"
    todo = broadcast_from_main(missing_settings(run, run_dir, step) if dist.main else None, dist, what)
    if not todo:
        return 0
    ev = run.eval
    device = dist.device
    extractor = (get_feature_extractor(ev.features, weights=ev.resolved_inception_weights(), device=device)
                 if ev.features == "inception" else get_feature_extractor(ev.features, device=device))
    reference = (load_reference(ev.resolved_reference(), extractor, image_size=run.data.image_size,
                                batch_size=ev.batch_size) if dist.main else None)
    if dist.world > 1:
        log.info("%s on %d ranks; a rank waits at most %s for the others (HARNESS_COLLECTIVE_TIMEOUT_S)",
                 what, dist.world, COLLECTIVE_TIMEOUT)
    for setting in todo:
        t0 = time.perf_counter()
        # round r: rank k samples global batch r * world + k; rank 0 collects the round's batches, so a
        # rank waits at most one batch's skew per round and no rank holds more than its own batch
        starts = range(0, ev.num_samples, ev.batch_size)
        batches = []
        for r in range(0, len(starts), dist.world):
            k = r + dist.rank
            part = _sample_batch(run, ema, dist, setting, extractor, step, starts[k]) if k < len(starts) else None
            batches += [b for b in gather_to_main(part, dist, what) or [] if b is not None]
        if dist.main:
            images = np.concatenate([b[1] for b in batches])
            name = f"samples_step_{step:07d}_k{setting['sampling_steps']}_cfg{setting['cfg_scale']:g}.npz"
            save_npz(images, np.concatenate([b[2] for b in batches]), RunFolder(run_dir).samples / name)
            metrics = metrics_from_features(Features.concat([b[3] for b in batches]), reference, extractor,
                                            list(ev.metrics))
            rec = dict(setting, model_evaluations=model_evaluations(ev.sampler, setting["sampling_steps"]),
                       **provenance(ev.sampler))
            for key in ("fid", "sfid", "inception_score", "precision", "recall", "fid_se"):
                rec[key] = metrics.get(key)
            # the requested space stays in `feature_space` (the setting's key); the network that
            # computed the numbers ("inception" only for the official FID weights) in `features_id`
            rec["features_id"] = metrics.get("feature_space", extractor.name)
            rec.update(wall_s=time.perf_counter() - t0, time=time.time(), ranks=dist.world)
            append_jsonl(RunFolder(run_dir).eval_log, rec)
            log.info("eval step %d %s", step, {k: rec[k] for k in ("sampling_steps", "cfg_scale", "fid")})
        bounded_barrier(dist, what)  # everyone leaves together, after the record is written
    return len(todo)


def pending_evals(run: RunSpec, run_dir: Path, ema_now: torch.nn.Module, dist: Dist,
                  upto: int, current: int) -> None:
    """All ranks: evaluate eval steps <= `upto` whose records are missing, from their retained
    checkpoints (rank 0 decides which; every rank loads the checkpoint)."""
    from harness.models import checkpoint as ckpt  # torch: status imports this module to count owed evaluations
    from harness.training.runtime import broadcast_from_main

    plan: list[tuple[int, str | None]] = []
    if dist.main:
        for s in sorted(int(x) for x in run.eval.at_steps):
            if s > upto or not missing_settings(run, run_dir, s):
                continue
            path = RunFolder(run_dir).checkpoint(s)
            if s != current and not path.exists():
                log.warning("eval step %d has no retained checkpoint; its evaluation is skipped", s)
                continue
            plan.append((s, None if s == current else str(path)))
    for s, path in broadcast_from_main(plan, dist, "pending evaluations"):
        ema = ema_now
        if path is not None:
            ema = copy.deepcopy(ema_now)
            ema.load_state_dict(ckpt.load_checkpoint(path)["ema"])
        evaluate_step(run, run_dir, ema, dist, s)
