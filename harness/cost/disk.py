"""What a sweep leaves on disk, for `harness plan`: the checkpoints each run keeps, its evaluation npz files
(as eval.keep_samples keeps them), its evaluations' stored FID features and the latent caches its runs share.
Upper bounds from the spec alone (nothing is read): a cluster's quota is checked before the jobs fill it.

Sizes (bytes): a checkpoint holds the weights, their EMA and AdamW's two moments, float32: 16 x params; a slim
one (an evaluated step's once it is not among the newest, under train.keep_optimizer: newest) 8 x params; an
ADM npz holds N images of H x W x 3 uint8 and N int64 labels; an evaluation's features N x D in the space's
dtype (vocab.FID_FEATURES: 2,048 float16 for Inception, 205 MB per FID-50K), every one kept; a latent cache
holds each image and its flip, C x h x w float16 through the VAE (float32 for the identity autoencoder).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from harness.config.spec import RunSpec
from harness.config.vocab import FID_FEATURES

CHECKPOINT_BYTES_PER_PARAM = 4 * 4   # weights, EMA, Adam exp_avg and exp_avg_sq, float32
SLIM_CHECKPOINT_BYTES_PER_PARAM = 2 * 4   # weights and EMA (harness.models.checkpoint.slim_checkpoint)
LABEL_BYTES = 8                      # the npz's arr_1, int64
GB = 1e9


def checkpoints_kept(run: RunSpec) -> tuple[int, int]:
    """(whole, slim): the most checkpoints a run keeps at the end: the newest train.keep_last, whole, and besides
    them those at eval.at_steps (retention spares them), slim under train.keep_optimizer: newest, whole under all.
    With train.ckpt_every_minutes on, all of the newest but the final one may be timed checkpoints (a last
    stretch of more than that many minutes), which spare no evaluated step."""
    tr = run.train
    if not tr.steps:
        return 0, 0
    saved = {s for s in range(tr.ckpt_every, tr.steps + 1, tr.ckpt_every)} | {tr.steps}
    evaluated = {s for s in run.eval.at_steps if 0 < s <= tr.steps}
    if tr.ckpt_every_minutes:  # at worst the newest are the final step and timed checkpoints just before it
        newest, count = {tr.steps}, tr.keep_last
    else:
        newest = set(sorted(saved | evaluated)[-tr.keep_last:])
        count = len(newest)
    slim = len(evaluated - newest)
    return (count, slim) if tr.keep_optimizer == "newest" else (count + slim, 0)


def samples_kept(run: RunSpec) -> int:
    """Evaluation npz files a run keeps at the end: one per setting at each evaluated step (all), at the last
    one (last), or none."""
    ev = run.eval
    per_step = len(ev.sampling_steps) * len(ev.cfg_scales)
    steps = {"all": len(set(ev.at_steps)), "last": 1, "none": 0}[ev.keep_samples]
    return per_step * steps


def features_bytes(run: RunSpec) -> int:
    """All of a run's stored FID features: one N x D file per setting at each evaluated step."""
    ev = run.eval
    dim, dtype = FID_FEATURES[ev.features]
    return len(ev.sampling_steps) * len(ev.cfg_scales) * len(set(ev.at_steps)) * ev.num_samples * dim * \
        np.dtype(dtype).itemsize


def run_disk(run: RunSpec, params: int, latent: tuple[int, int, int]) -> dict:
    """{checkpoints_gb, samples_gb, features_gb} of one run; `latent` (C, h, w) gives no size here (the cache
    is shared)."""
    side = run.data.image_size
    npz = run.eval.num_samples * (side * side * 3 + LABEL_BYTES)
    whole, slim = (0, 0) if run.checkpoints_from else checkpoints_kept(run)
    ckpt = (whole * CHECKPOINT_BYTES_PER_PARAM + slim * SLIM_CHECKPOINT_BYTES_PER_PARAM) * params
    return {"checkpoints_gb": ckpt / GB, "samples_gb": samples_kept(run) * npz / GB,
            "features_gb": features_bytes(run) / GB}


def latent_cache_gb(images: int | None, latent: tuple[int, int, int], autoencoder: str) -> float | None:
    """One latent cache: every image and its flip, C x h x w, float16 (VAE) or float32 (identity)."""
    if images is None:
        return None
    c, h, w = latent
    return images * 2 * c * h * w * (4 if autoencoder == "identity" else 2) / GB


def sweep_disk(runs: list[RunSpec], plans: list[Any], images: list[int | None]) -> dict:
    """{checkpoints_gb, samples_gb, features_gb, latents_gb (None when a data set's size is unknown), total_gb} for the
    planned runs (`plans`: their RunPlans, for params and input shape; `images`: each run's training images)."""
    per_run = [run_disk(r, p.params, (p.in_channels, p.input_size, p.input_size)) for r, p in zip(runs, plans)]
    caches: dict = {}
    for r, p, n in zip(runs, plans, images):  # one cache per data set, size and autoencoder, as the stage builds
        d = r.data
        if not r.checkpoints_from:
            key = (d.dataset, d.path, d.autoencoder, d.autoencoder_path, d.image_size)
            caches[key] = latent_cache_gb(n, (p.in_channels, p.input_size, p.input_size), d.autoencoder)
    latents = None if any(v is None for v in caches.values()) else sum(caches.values())
    out = {"checkpoints_gb": sum(x["checkpoints_gb"] for x in per_run),
           "samples_gb": sum(x["samples_gb"] for x in per_run),
           "features_gb": sum(x["features_gb"] for x in per_run), "latents_gb": latents}
    out["total_gb"] = out["checkpoints_gb"] + out["samples_gb"] + out["features_gb"] + (latents or 0.0)
    return out


def format_disk(d: dict) -> str:
    latents = (f"latent caches {d['latents_gb']:,.1f} GB" if d["latents_gb"] is not None
               else "latent caches: unknown (a data set's size is not known here)")
    return (f"disk (at most, at the end): checkpoints {d['checkpoints_gb']:,.1f} GB (train.keep_last whole, the "
            f"other eval.at_steps ones as train.keep_optimizer keeps them), sample npz files "
            f"{d['samples_gb']:,.1f} GB (eval.keep_samples), FID features {d['features_gb']:,.1f} GB, {latents}; "
            f"total {d['total_gb']:,.1f} GB")
