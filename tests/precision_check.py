"""The fp32-versus-bf16 sampling check (issue 23), shared by the CPU test and the GPU check.

Rule, fixed before any run: the same model, labels and seeds are sampled twice, once in fp32 (eager)
and once in bf16 (compiled where the device compiles); each set's FID against one reference comes
with its bootstrap standard error (harness.metrics.stats.fid_bootstrap); the two measure the same thing
when |FID_fp32 - FID_bf16| <= sqrt(se_fp32^2 + se_bf16^2), their combined standard error.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from harness.metrics import metrics_from_features
from harness.metrics.reference import ReferenceStats
from harness.sampling import sample as sample_mod
from harness.sampling.sample import balanced_labels, sample_images


def repeated_noise(sample_seed: Any, batch: int) -> Any:
    """A planted error: every batch starts from the first batch's noise (samples seeded by their index in
    the batch, not in the set), as a lost `first_index` in the batching, padding or rank code would do."""
    return lambda seed, index: sample_seed(seed, index % batch if index >= 0 else index)


def fid_pair(model: torch.nn.Module, autoencoder: Any, extractor: Any, reference: ReferenceStats, n: int,
             num_classes: int, *, steps: int, cfg_scale: float, batch: int, compile_bf16: bool,
             plant: bool = False) -> dict:
    """{fp32: (fid, se), bf16: (fid, se), diff, combined_se, passes, changed_pixels} for n class-balanced
    samples (DDIM, deterministic: the two sets differ by rounding alone, unless `plant` puts
    `repeated_noise` into the bf16 run)."""
    labels = balanced_labels(n, num_classes)
    out = {}
    for precision, compiled in (("fp32", False), ("bf16", compile_bf16)):
        planted = plant and precision == "bf16"
        patch = _patched(sample_mod, "_sample_seed", repeated_noise(sample_mod._sample_seed, batch)) if planted else nullcontext()
        with patch:
            images = sample_images(model, None, labels, sampling_steps=steps, sampler="ddim", cfg_scale=cfg_scale,
                                   guidance_channels="all", seed=0, batch_size=batch, autoencoder=autoencoder,
                                   precision=precision, compile=compiled)
        m = metrics_from_features(extractor.extract(images, batch), reference, extractor, ["fid"])
        out[precision] = (m["fid"], m["fid_se"])
        out[f"{precision}_images"] = images
    (a, sa), (b, sb) = out["fp32"], out["bf16"]
    out["diff"], out["combined_se"] = abs(a - b), math.sqrt(sa**2 + sb**2)
    out["passes"] = out["diff"] <= out["combined_se"]
    out["changed_pixels"] = float(np.mean(out["fp32_images"] != out["bf16_images"]))
    return out


class _patched:
    def __init__(self, module: Any, name: str, value: Any):
        self.module, self.name, self.value = module, name, value

    def __enter__(self) -> None:
        self.old = getattr(self.module, self.name)
        setattr(self.module, self.name, self.value)

    def __exit__(self, *exc: Any) -> None:
        setattr(self.module, self.name, self.old)


def nudged(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Every weight plus scale x N(0, 1) (adaLN-Zero starts at exactly zero output: labels and noise would not matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.device))
    return model
