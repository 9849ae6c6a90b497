"""`harness sample` samples with the EMA weights unless --no-ema asks for the raw ones (issue 16):
its npz equals the samples of a model built independently and loaded with each weight set."""
from __future__ import annotations

import numpy as np
import torch

from harness.models.checkpoint import save_checkpoint
from harness.cli import main
from harness.config.spec import RunSpec
from harness.models.dit import build_model
from harness.sampling.sample import sample_images
from train_tiny import nudged_tiny_dit

#: the run record a checkpoint holds (partial, as an old one may be) and the RunSpec it reads as
RECORD = {"model": "DiT-2x32x2/2", "conditioning": "adaLN-Zero", "seed": 0,
          "data": {"dataset": "digits", "path": None, "image_size": 8, "autoencoder": "identity",
                   "autoencoder_path": None, "num_classes": 10},
          "train": {"class_dropout": 0.1}}
RUN = RunSpec.from_dict(RECORD, required=("model",))


def _weights(seed: int) -> dict:
    return nudged_tiny_dit(seed).state_dict()


def _reference_samples(weights: dict, n: int, steps: int, seed: int) -> np.ndarray:
    model = build_model(RUN.model, "adaLN-Zero", input_size=8, in_channels=1, num_classes=10)
    model.load_state_dict(weights)
    labels = torch.arange(n) % 10
    return sample_images(model.eval(), RUN, labels, sampling_steps=steps, sampler="ddim", seed=seed)


def test_harness_sample_uses_ema_by_default_and_raw_only_when_asked(tmp_path):
    raw, ema = _weights(1), _weights(2)
    ckpt = save_checkpoint(tmp_path / "ckpt", 5, {"model": raw, "ema": ema, "opt": {}, "step": 5, "run": RECORD})
    args = ["sample", "--checkpoint", str(ckpt), "--num-samples", "6", "--steps", "4", "--sampler", "ddim",
            "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "default")]) == 0
    assert main(args + ["--no-ema", "--out", str(tmp_path / "raw")]) == 0
    with np.load(tmp_path / "default" / "samples.npz") as f:
        default = f["arr_0"]
    with np.load(tmp_path / "raw" / "samples.npz") as f:
        no_ema = f["arr_0"]
    want_ema, want_raw = _reference_samples(ema, 6, 4, 3), _reference_samples(raw, 6, 4, 3)
    assert not np.array_equal(want_ema, want_raw), "the two weight sets sample alike: the test has no teeth"
    np.testing.assert_array_equal(default, want_ema)
    np.testing.assert_array_equal(no_ema, want_raw)
