"""Evaluation at training steps: sample with the EMA model on every rank, compute the metrics, write
the ADM npz (as eval.keep_samples says) and the FID features (features/, named in the record) and append
eval.jsonl (the protocol -- which settings, which are recorded, which npz files eval.keep_samples keeps -- is
`harness.training.evaluation`).

Called by EVERY rank with the same (identical) EMA model. The samples are cut into global batches of
the resolved sampling batch; batch b is sampled (and its features computed) by rank b mod world, so each
image, and each feature row, is computed from exactly the same inputs and batch whatever the number of
ranks. Rank 0 takes every decision (what to evaluate), gathers each round's batches (one per rank),
streams their images into the ADM npz and keeps only their features: its host memory for images is one
gathered round, whatever num_samples is.

Sampling runs as `eval.precision`, `eval.compile` and `eval.batch_size` resolve on the device
(`EvalSetup`); none of them is part of a record's setting, since they change the samples by rounding
only (tests/test_eval_precision.py checks that the FID does not move beyond its bootstrap error).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.config.layout import RunFolder, features_name
from harness.config.spec import RunSpec
from harness.config.vocab import guidance_on
from harness.io import append_jsonl, atomic_write
from harness.metrics import get_feature_extractor, load_reference, metrics_from_features
from harness.metrics.features import FeatureExtractor, Features, stored_features
from harness.models import checkpoint as ckpt
from harness.models.compiled import resolve_compile, resolve_precision
from harness.sampling.batch import auto_sample_batch, find_decode_batch
from harness.sampling.npz import NpzWriter
from harness.sampling.sample import (LABELS_BALANCED, NOISE_SCHEME, autoencoder_for, balanced_labels, sample_images,
                                    save_grid as write_grid)
from harness.sampling.samplers import model_evaluations, provenance
from harness.training.evaluation import TAG_EVAL, missing_settings, prune_samples, writes_samples
from harness.training.runtime import (COLLECTIVE_TIMEOUT, Dist, all_reduce, bounded_barrier, broadcast_from_main,
                                      derive_seed, gather_to_main)

log = logging.getLogger(__name__)


def save_grid(run: RunSpec, run_dir: Path, ema: torch.nn.Module, dist: Dist, step: int, n: int = 16) -> Path | None:
    """Rank 0: a grid of `n` class-balanced EMA samples, samples/grid_step_XXXXXXX.png (others: None)."""

    if not dist.main:
        return None
    ev = run.eval
    labels = balanced_labels(n, run.data.num_classes)
    images = sample_images(ema, run, labels, sampling_steps=min(ev.sampling_steps), sampler=ev.sampler,
                           cfg_scale=max(ev.cfg_scales), guidance_channels=ev.guidance_channels,
                           seed=derive_seed(run.seed, step, tag=TAG_EVAL), device=dist.device)
    path = RunFolder(run_dir).grid(step)
    write_grid(images, path)
    return path


@dataclass(frozen=True)
class EvalSetup:
    """How this evaluation samples on its devices: eval.precision and eval.compile (in eval.compile_mode) resolved for the
    device, the sampling batch (images; the network sees 2x under guidance) and the decode/features chunk."""
    precision: str
    compile: bool
    batch: int
    decode_batch: int
    compile_mode: str = "default"


def resolve_setup(run: RunSpec, ema: torch.nn.Module, dist: Dist, extractor: FeatureExtractor) -> EvalSetup:
    """eval.precision/compile/batch_size for this device; with several ranks every rank takes the
    smallest batch any rank found, so the global batches (and hence the samples) agree."""

    ev, device = run.eval, dist.device
    precision = resolve_precision(ev.precision, device)
    compiled = resolve_compile(ev.compile, device, where="eval.compile")
    guided = any(guidance_on(c) for c in ev.cfg_scales)
    batch = (auto_sample_batch(ema, ev.num_samples, guided, precision, device) if ev.batch_size == "auto"
             else int(ev.batch_size))
    latent = (int(ema.in_channels), int(ema.input_size), int(ema.input_size))
    decode = find_decode_batch(autoencoder_for(run), extractor, latent, batch, precision, device)
    if dist.world > 1:
        both = all_reduce(torch.tensor([batch, decode], device=device), dist, "min").tolist()
        batch, decode = int(both[0]), int(both[1])
    log.info("evaluation: sampling batch %d (%s), %s, %s; decode and features in chunks of %d", batch,
             ev.batch_size, precision, f"compiled ({ev.compile_mode})" if compiled else "eager", decode)
    return EvalSetup(precision, compiled, batch, decode, ev.compile_mode)


def _sample_batch(run: RunSpec, ema: torch.nn.Module, dist: Dist, setting: dict, extractor: FeatureExtractor, step: int,
                  first: int, setup: EvalSetup) -> tuple[int, np.ndarray, np.ndarray, Features]:
    """Global batch starting at sample `first`: (first, uint8 images (B, H, W, 3), labels (B,),
    Features of the B images)."""

    ev = run.eval
    y = balanced_labels(ev.num_samples, run.data.num_classes)[first : first + setup.batch]
    images = sample_images(ema, run, y, sampling_steps=setting["sampling_steps"], sampler=ev.sampler,
                           cfg_scale=setting["cfg_scale"], guidance_channels=ev.guidance_channels,
                           seed=_noise_seed(run, step, setting),
                           device=dist.device, batch_size=setup.batch, first_index=first,
                           precision=setup.precision, compile=setup.compile, decode_batch=setup.decode_batch,
                           compile_mode=setup.compile_mode)
    return first, images, y.numpy(), extractor.extract(images, setup.decode_batch)


def _noise_seed(run: RunSpec, step: int, setting: dict) -> int:
    """The seed of a setting's noise: every run of a sweep with the same seed shares it at a step and sampling steps."""
    return derive_seed(run.seed, step, setting["sampling_steps"], tag=TAG_EVAL)


def _provenance(run: RunSpec, ema: torch.nn.Module, step: int, setting: dict) -> dict:
    """What proves two records' samples paired (sample i: the same label and noise; harness.study.pairing)."""
    return {"noise_seed": _noise_seed(run, step, setting), "noise_scheme": NOISE_SCHEME,
            "noise_shape": [int(ema.in_channels), int(ema.input_size), int(ema.input_size)],
            "labels": LABELS_BALANCED, "num_classes": int(run.data.num_classes)}


def write_fid_features(run_dir: Path, setting: dict, pool: np.ndarray, space: str) -> str:
    """features/<name>, atomically: the FID features (N, D) in sample order (`stored_features`: float16 in the
    Inception space); returns the name, for the record."""
    name = features_name(setting)
    atomic_write(RunFolder(run_dir).features_file(name), lambda f: np.save(f, stored_features(pool, space)))
    return name


def _sample_setting(run: RunSpec, run_dir: Path, ema: torch.nn.Module, dist: Dist, setting: dict, extractor: FeatureExtractor,
                    step: int, setup: EvalSetup, keep: bool) -> list | None:
    """All ranks sample one setting; rank 0 streams the images into its ADM npz (if `keep`) and returns
    the features of every batch in order (others: None)."""

    ev, what = run.eval, f"evaluation of step {step}"
    side = run.data.image_size
    path = RunFolder(run_dir).samples_npz(setting)   # the setting its record will hold
    writer = NpzWriter(path, ev.num_samples, side, side) if dist.main and keep else None
    features = []
    try:
        # round r: rank k samples global batch r * world + k; rank 0 collects the round's batches, so a
        # rank waits at most one batch's skew per round and rank 0 holds one round of images at a time
        starts = range(0, ev.num_samples, setup.batch)
        for r in range(0, len(starts), dist.world):
            k = r + dist.rank
            part = (_sample_batch(run, ema, dist, setting, extractor, step, starts[k], setup)
                    if k < len(starts) else None)
            features += _write_round(gather_to_main(part, dist, what), writer)
            part = None  # this round's images are on disk: nothing holds them while the next is sampled
        if writer is not None:
            writer.close()
    finally:
        if writer is not None:
            writer.abort()
    return features if dist.main else None


def _write_round(parts: list | None, writer: NpzWriter | None) -> list[Features]:
    """Rank 0: the round's batches (first, images, labels, features) appended to the npz in order (if there
    is a writer); their features. Other ranks (parts None): nothing."""
    features = []
    for part in parts or []:
        if part is not None:
            if writer is not None:
                writer.add(part[1], part[2])
            features.append(part[3])
    return features


def evaluate_step(run: RunSpec, run_dir: str | Path, ema: torch.nn.Module, dist: Dist, step: int) -> int:
    """All ranks: sample eval.num_samples class-balanced images per missing (sampling_steps, cfg_scale)
    with the EMA model, sharded over the ranks; rank 0 computes eval.metrics in eval.features space
    against eval.reference from the gathered features, writes the ADM npz (as eval.keep_samples says) and the
    FID features, appends eval.jsonl (with the provenance that proves two records' samples paired:
    `_provenance`), then removes the npz files the records replace. Returns the number of records appended
    (on every rank). No rank waits for another longer than runtime.COLLECTIVE_TIMEOUT."""

    run_dir = Path(run_dir)
    what = f"evaluation of step {step}"
    todo = broadcast_from_main(missing_settings(run, run_dir, step) if dist.main else None, dist, what)
    if not todo:
        return 0
    ev = run.eval
    device = dist.device
    extractor = (get_feature_extractor(ev.features, weights=ev.resolved_inception_weights(), device=device)
                 if ev.features == "inception" else get_feature_extractor(ev.features, device=device))
    setup = resolve_setup(run, ema, dist, extractor)
    reference = load_reference(ev.resolved_reference(), extractor, image_size=run.data.image_size) if dist.main else None
    if dist.world > 1:
        log.info("%s on %d ranks; a rank waits at most %s for the others (HARNESS_COLLECTIVE_TIMEOUT_S)",
                 what, dist.world, COLLECTIVE_TIMEOUT)
    keep = dist.main and writes_samples(run, run_dir, step)
    for setting in todo:
        t0 = time.perf_counter()
        features = _sample_setting(run, run_dir, ema, dist, setting, extractor, step, setup, keep)
        if dist.main:
            feats = Features.concat(features)
            metrics = metrics_from_features(feats, reference, extractor, list(ev.metrics))
            rec = dict(setting, model_evaluations=model_evaluations(ev.sampler, setting["sampling_steps"]),
                       **provenance(ev.sampler), **_provenance(run, ema, step, setting))
            for key in ("fid", "sfid", "inception_score", "precision", "recall", "fid_se"):
                rec[key] = metrics.get(key)
            # the requested space stays in `feature_space` (the setting's key); the network that
            # computed the numbers ("inception" only for the official FID weights) in `features_id`
            rec["features_id"] = metrics.get("feature_space", extractor.name)
            # before the record, so a record never names a file that is not there (a kill in between leaves a
            # file that the setting's next evaluation replaces)
            rec["fid_features"] = write_fid_features(run_dir, setting, feats.pool, ev.features)
            # how it was sampled: not part of the setting (the measurement is the same, see CONTRIBUTING)
            rec.update(sample_precision=setup.precision, sample_compiled=setup.compile,
                       sample_compile_mode=setup.compile_mode if setup.compile else None, sample_batch=setup.batch)
            rec.update(wall_s=time.perf_counter() - t0, time=time.time(), ranks=dist.world)
            append_jsonl(RunFolder(run_dir).eval_log, rec)
            log.info("eval step %d %s", step, {k: rec[k] for k in ("sampling_steps", "cfg_scale", "fid")})
            prune_samples(run, run_dir)  # after the record: a kill in between leaves a file, never a gap
        bounded_barrier(dist, what)  # everyone leaves together, after the record is written
    return len(todo)


def pending_evals(run: RunSpec, run_dir: Path, ema_now: torch.nn.Module, dist: Dist,
                  upto: int, current: int) -> None:
    """All ranks: evaluate eval steps <= `upto` whose records are missing, from their retained
    checkpoints (rank 0 decides which; every rank loads the checkpoint). Rank 0 first removes the npz
    files that eval.keep_samples no longer keeps (what a kill after a record left, or a changed value)."""

    plan: list[tuple[int, str | None]] = []
    if dist.main:
        prune_samples(run, run_dir)
        for s in sorted(int(x) for x in run.eval.at_steps):
            if s > upto or not missing_settings(run, run_dir, s):
                continue
            path = RunFolder(run_dir).checkpoint(s)
            if s != current and not path.exists():
                log.warning("eval step %d has no retained checkpoint; its evaluation is skipped", s)
                continue
            plan.append((s, None if s == current else str(path)))
    scratch = None  # one copy for every older checkpoint, so its compiled sampling graphs serve them all
    for s, path in broadcast_from_main(plan, dist, "pending evaluations"):
        ema = ema_now
        if path is not None:
            scratch = copy.deepcopy(ema_now) if scratch is None else scratch
            scratch.load_state_dict(ckpt.load_checkpoint(path)["ema"])
            ema = scratch
        evaluate_step(run, run_dir, ema, dist, s)
