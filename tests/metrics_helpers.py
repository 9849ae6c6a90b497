"""Test-only helpers of the metrics: the Frechet distance of two raw feature sets, and random
FID-Inception weights with sane activation scales (so tests and offline checks run without the real file)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from harness.io import atomic_write
from harness.metrics.inception import POOL_DIM, _fidelity_class
from harness.metrics.stats import frechet_distance, gaussian_stats


def frechet_distance_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*gaussian_stats(feats1), *gaussian_stats(feats2))


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0, calibration_images: int = 4) -> Path:
    """Write a randomly initialised FID-Inception state dict with sensible activation scales.

    For tests only: the numbers it gives mean nothing (and are recorded under
    an `inception-custom-*` feature space). Convolutions get He-normal weights, the logits layer
    1/sqrt(2048); BatchNorm running statistics are calibrated on a few random images so every layer
    sees unit-scale inputs.
    """
    cls = _fidelity_class()

    class _Unloaded(cls):  # build the architecture, keep PyTorch's init instead of loading weights
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    gen = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.reset_parameters()
                m.momentum = None  # cumulative average: running stats = the calibration batch's
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=gen) / POOL_DIM ** 0.5)
        net.fc.bias.zero_()
        images = torch.randint(0, 256, (calibration_images, 3, 64, 64), generator=gen, dtype=torch.uint8)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.train()
        net(images)
        net.eval()
    state = net.state_dict()
    return atomic_write(path, lambda f: torch.save(state, f))
