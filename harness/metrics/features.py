"""Feature spaces: the common interface of the Inception and digits feature extractors."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from harness.config.vocab import FID_FEATURES
from harness.errors import HarnessError

log = logging.getLogger(__name__)


@dataclass
class Features:
    """Per-image features of one feature space.

    pool: (N, D) pooled features (FID, precision, recall); spatial: (N, Ds) spatial features
    (sFID); logits: (N, K) class logits (Inception Score). All float32.
    """
    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray

    def __len__(self) -> int:
        return int(self.pool.shape[0])

    @classmethod
    def concat(cls, parts: list["Features"]) -> "Features":
        """The rows of `parts`, in order, as one Features."""
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("pool", "spatial", "logits")))


def stored_features(pool: np.ndarray, space: str) -> np.ndarray:
    """FID features (N, D) as evaluation stores them: in `FID_FEATURES`' dtype for the space (float16 only when
    every value fits), else float32."""
    if FID_FEATURES.get(space, (0, "float32"))[1] == "float16":
        half = pool.astype(np.float16)
        if np.isfinite(half).all():
            return half
    return pool.astype(np.float32)


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Validate an ADM-layout batch: uint8 (N, H, W, 3). Returns it as a numpy array."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise HarnessError(f"{what}: expected uint8 images of shape (N, H, W, 3) (the ADM npz layout, "
                           f"key arr_0), got {images.dtype} {images.shape}; save samples as uint8 NHWC RGB")
    return images


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FeatureExtractor:
    """Maps uint8 images (N, H, W, 3) to `Features`, in batches, without gradients.

    `name` is what every recorded number carries (numbers from different names are never compared);
    `identity` additionally pins the exact weights, and keys cached reference statistics.
    """
    name: str = "base"
    identity: str = "base"
    device: torch.device = torch.device("cpu")

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """batch: uint8 (B, H, W, 3) on self.device -> pool (B, D), spatial (B, Ds), logits (B, K)."""
        raise NotImplementedError

    @torch.no_grad()
    def extract(self, images: np.ndarray, batch_size: int = 100) -> Features:
        images = check_images(images)
        if batch_size < 1:
            raise HarnessError(f"batch_size must be >= 1, got {batch_size} (--batch-size / eval.batch_size)")
        pools, spatials, logits = [], [], []
        t0 = time.perf_counter()
        for start in range(0, images.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(self.device)
            p, s, l = self._forward(batch)
            pools.append(p.float().cpu().numpy())
            spatials.append(s.float().cpu().numpy())
            logits.append(l.float().cpu().numpy())
        wall = time.perf_counter() - t0
        log.debug("%s: %d images in %.2fs (%.1f images/s)", self.name, images.shape[0], wall,
                  images.shape[0] / max(wall, 1e-9))
        return Features(np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits))
