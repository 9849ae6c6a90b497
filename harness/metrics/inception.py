"""Inception-V3 features for FID, sFID, IS and precision/recall, as ADM's TensorFlow evaluator sees them.

The network is torch-fidelity's bit-faithful port of the 2015 TensorFlow FID Inception graph
(TF-style bilinear resize to 299, (x - 128) / 128). One forward pass gives all three outputs:
- pool: `pool_3`, the 2048-d average pool (FID, precision, recall);
- spatial: `mixed_6/conv`, the 1x1 branch of the third 17x17 block (torch-fidelity `Mixed_6d.branch1x1`),
  its first 7 channels flattened in (H, W, C) order: 17 x 17 x 7 = 2023-d (sFID), caught with a
  forward hook;
- logits: pool_3 times the softmax weights, without the bias (ADM's IS graph; 1008 classes).

Weights are never downloaded at run time. They load from, in order: an explicit path
(`--inception-weights`, `eval.inception_weights`), $HARNESS_INCEPTION_WEIGHTS, or the torch hub
cache, where torch-fidelity itself stores them.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.io import atomic_write, sha256_file
from harness.metrics.features import FeatureExtractor, default_device

log = logging.getLogger(__name__)

WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_FILENAME = WEIGHTS_URL.rsplit("/", 1)[1]
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch hub convention: the file name carries its sha256 prefix
WEIGHTS_ENV = "HARNESS_INCEPTION_WEIGHTS"
SPATIAL_CHANNELS = 7
POOL_DIM, SPATIAL_DIM, NUM_LOGITS = 2048, 17 * 17 * SPATIAL_CHANNELS, 1008


def hub_weights_path() -> Path:
    """Where torch hub (and torch-fidelity) cache the FID Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def resolve_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file to use; HarnessError saying where to put it when there is none."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise HarnessError(f"Inception weights file {p} (--inception-weights / eval.inception_weights) "
                               f"does not exist. Fix: download {WEIGHTS_URL} there, or leave the option unset "
                               f"to use {hub_weights_path()}")
        return p
    candidates = []
    if os.environ.get(WEIGHTS_ENV):
        candidates.append(Path(os.environ[WEIGHTS_ENV]).expanduser())
    candidates.append(hub_weights_path())
    for p in candidates:
        if p.is_file():
            return p
    hub = hub_weights_path()
    raise HarnessError(
        f"FID Inception weights not found (looked at: {', '.join(str(c) for c in candidates)}). "
        f"Fix: download them once: `mkdir -p {hub.parent} && curl -L {WEIGHTS_URL} -o {hub}`, or point "
        f"--inception-weights / eval.inception_weights / ${WEIGHTS_ENV} at a local copy; "
        "for CPU studies without them use the digits feature space (--features digits)")


def _fidelity_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise HarnessError("torch-fidelity is not installed; `pip install torch-fidelity` "
                           "(it is a dependency in pyproject.toml)") from err
    return FeatureExtractorInceptionV3


class InceptionFeatures(FeatureExtractor):
    """ADM-compatible Inception-V3 features; see the module docstring."""

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device | None = None):
        path = resolve_weights(weights)
        sha = sha256_file(path)
        official = sha.startswith(WEIGHTS_SHA256_PREFIX)
        # Numbers from other weights must never sit next to real FIDs: they get their own name.
        self.name = "inception" if official else f"inception-custom-{sha[:8]}"
        self.identity = f"inception-fid-{sha[:16]}"
        self.weights_path = path
        self.device = torch.device(device) if device is not None else default_device()
        if not official:
            log.warning("Inception weights %s are not the FID weights (sha256 %s...); numbers are "
                        "recorded under feature space %r", path, sha[:8], self.name)
        cls = _fidelity_class()
        try:
            net = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
        except Exception as err:
            raise HarnessError(f"Inception weights file {path} could not be loaded ({type(err).__name__}: "
                               f"{str(err)[:200]}); replace it with {WEIGHTS_URL}") from err
        self.net = net.to(self.device).eval()
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output: torch.Tensor) -> None:
        # output (B, 192, 17, 17) -> first 7 channels in TF's (H, W, C) order -> (B, 2023)
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).clone()

    def _forward(self, batch: torch.Tensor):
        self._spatial = None
        pool, logits = self.net(batch.permute(0, 3, 1, 2).contiguous())
        spatial, self._spatial = self._spatial, None
        assert spatial is not None, "the mixed_6/conv hook did not fire"
        return pool, spatial, logits


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0, calibration_images: int = 4) -> Path:
    """Write a randomly initialised FID-Inception state dict with sensible activation scales.

    For tests, offline smoke runs and the evaluation benchmark (harness.sampling.bench) only: the numbers it gives mean nothing (and are recorded under
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
