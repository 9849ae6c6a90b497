"""An embedded feature space for CPU studies: a small CNN trained in seconds on the digits dataset.

Without Inception weights (offline, CPU-only) the five metrics still exist, computed in this space:
- pool: global average of the last conv layer (32-d)            -> FID, precision, recall
- spatial: first 8 channels of the 4x4 middle layer (128-d)     -> sFID (the analogue of mixed_6/conv)
- logits: the 10-way digit classifier                           -> Inception Score (at most 10)

The classifier is trained deterministically (fixed seed, fixed split) on 80% of scikit-learn's
digits and checked on the held-out 20%; the weights are cached under the harness cache, keyed by a
hash of the config below. Numbers from this space carry the name "digits" and are never comparable
to Inception numbers.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.io import atomic_write, cache_dir
from harness.metrics.features import FeatureExtractor, default_device
from harness.data.datasets import load_digits

log = logging.getLogger(__name__)

DIGITS_CONFIG: dict = {
    "version": 1, "seed": 0, "holdout_fraction": 0.2, "epochs": 20, "batch": 64, "lr": 3e-3,
    "weight_decay": 1e-4, "widths": [16, 32, 32, 32], "spatial_channels": 8,
}
MIN_HELDOUT_ACCURACY = 0.95
SIDE = 8


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


class DigitsNet(nn.Module):
    """(B, 1, 8, 8) in [-1, 1] -> pool (B, w4), spatial (B, sc * 16), logits (B, 10)."""

    def __init__(self, widths: list[int], spatial_channels: int, num_classes: int = 10):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.conv1 = nn.Conv2d(1, w1, 3, padding=1)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1)
        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1)
        self.conv4 = nn.Conv2d(w3, w4, 3, padding=1)
        self.fc = nn.Linear(w4, num_classes)
        self.spatial_channels = spatial_channels

    def forward(self, x: torch.Tensor):
        x = F.relu(self.conv1(x))                      # B, w1, 8, 8
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)     # B, w2, 4, 4
        mid = F.relu(self.conv3(x))                    # B, w3, 4, 4
        x = F.relu(self.conv4(mid))                    # B, w4, 4, 4
        pool = x.mean(dim=(2, 3))                      # B, w4
        spatial = mid[:, :self.spatial_channels].permute(0, 2, 3, 1).flatten(1)  # (H, W, C) order
        return pool, spatial, self.fc(pool)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, H, W) -> float (B, 1, 8, 8) in [-1, 1] (channel mean; resized if not 8x8)."""
    x = images.float()
    if x.ndim == 4:
        x = x.mean(dim=-1)
    x = x[:, None] / 127.5 - 1.0
    if x.shape[-2:] != (SIDE, SIDE):
        x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
    return x


def _split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train / held-out index split, fixed by seed."""
    rng = np.random.RandomState(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = int(round(len(idx) * fraction))
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def train_digits_classifier(config: dict = DIGITS_CONFIG) -> tuple[DigitsNet, float]:
    """Train the digits CNN deterministically on its train split; returns (net, held-out accuracy)."""
    images, labels = load_digits()
    train_idx, held_idx = _split(labels, config["holdout_fraction"], config["seed"])
    x = to_input(torch.from_numpy(images))
    y = torch.from_numpy(labels)
    torch.manual_seed(config["seed"])
    gen = torch.Generator().manual_seed(config["seed"])
    net = DigitsNet(config["widths"], config["spatial_channels"])
    opt = torch.optim.AdamW(net.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    steps_per_epoch = -(-len(train_idx) // config["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config["lr"],
                                                total_steps=config["epochs"] * steps_per_epoch)
    xt, yt = x[train_idx], y[train_idx]
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is faster, and deterministic
    try:
        _fit(net, opt, sched, xt, yt, gen, config)
    finally:
        torch.set_num_threads(threads)
    net.eval()
    with torch.no_grad():
        acc = (net(x[held_idx])[2].argmax(1) == y[held_idx]).float().mean().item()
    log.info("digits classifier: held-out accuracy %.4f on %d images, trained in %.1fs",
             acc, len(held_idx), time.perf_counter() - t0)
    return net, acc


def _fit(net, opt, sched, xt, yt, gen, config) -> None:
    net.train()
    for _ in range(config["epochs"]):
        order = torch.randperm(len(yt), generator=gen)
        for start in range(0, len(order), config["batch"]):
            b = order[start:start + config["batch"]]
            loss = F.cross_entropy(net(xt[b])[2], yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def load_digits_classifier(config: dict = DIGITS_CONFIG, cache: Path | None = None) -> tuple[DigitsNet, float, str]:
    """The cached classifier (trained on first use); returns (net, held-out accuracy, config hash)."""
    key = config_hash(config)
    path = (cache or cache_dir("features")) / f"digits-cnn-{key}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            net = DigitsNet(config["widths"], config["spatial_channels"])
            net.load_state_dict(blob["state_dict"])
            return net.eval(), float(blob["heldout_accuracy"]), key
        except Exception as err:  # a torn or stale cache file: retrain and overwrite it
            log.warning("ignoring unreadable digits classifier cache %s (%s)", path, err)
    net, acc = train_digits_classifier(config)
    if acc < MIN_HELDOUT_ACCURACY:
        raise HarnessError(f"digits classifier reached only {acc:.3f} held-out accuracy "
                           f"(< {MIN_HELDOUT_ACCURACY}); check DIGITS_CONFIG in harness/metrics/digits.py")
    buf = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "heldout_accuracy": acc, "config": config}, buf)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return net, acc, key


class DigitsFeatures(FeatureExtractor):
    """The digits feature space (see module docstring). Accepts uint8 (N, H, W, 3); 8x8 is native."""

    name = "digits"

    def __init__(self, device: str | torch.device | None = None, config: dict = DIGITS_CONFIG):
        net, self.heldout_accuracy, key = load_digits_classifier(config)
        self.identity = f"digits-cnn-{key}"
        self.device = torch.device(device) if device is not None else default_device()
        self.net = net.to(self.device)
        self._warned = False

    def _forward(self, batch: torch.Tensor):
        if batch.shape[1:3] != (SIDE, SIDE) and not self._warned:
            log.warning("digits feature space: resizing %dx%d images to 8x8", batch.shape[1], batch.shape[2])
            self._warned = True
        return self.net(to_input(batch))
