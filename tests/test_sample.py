"""Sampling: a tiny untrained DiT through DDPM/DDIM and CFG, grids, ADM npz, `harness sample`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config.spec import RunSpec
from harness.models.checkpoint import save_checkpoint
from harness.models.dit import build_model
from harness.sampling.npz import save_npz
from harness.sampling.sample import balanced_labels, make_grid, sample_images, save_grid

#: the run record a checkpoint holds (partial, as an old one may be) and the RunSpec it reads as
RECORD = {"model": "DiT-2x32x2/2", "conditioning": "adaLN-Zero", "seed": 0,
          "data": {"dataset": "digits", "path": None, "image_size": 8, "autoencoder": "identity",
                   "autoencoder_path": None, "num_classes": 10},
          "train": {"class_dropout": 0.1}}
RUN = RunSpec.from_dict(RECORD, required=("model",))


def tiny_model(in_channels: int = 1, input_size: int = 8, perturb: bool = True):
    torch.manual_seed(0)
    model = build_model("DiT-2x32x2/2", "adaLN-Zero", input_size=input_size, in_channels=in_channels, num_classes=10)
    if perturb:  # adaLN-Zero starts at exactly zero output; nudge it so labels and guidance matter
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_balanced_labels():
    y = balanced_labels(25, 10)
    assert y.dtype == torch.long and y.shape == (25,)
    counts = np.bincount(y.numpy(), minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 25


def test_sample_images_shape_dtype_and_determinism():
    model = tiny_model()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(torch.is_inference_mode_enabled()))
    labels = balanced_labels(5, 10)
    a = sample_images(model, RUN, labels, sampling_steps=4, sampler="ddim", seed=1, batch_size=5)
    assert a.shape == (5, 8, 8, 3) and a.dtype == np.uint8
    assert np.array_equal(a[..., 0], a[..., 2])  # grey replicated to RGB
    assert seen and all(seen) and model.training  # sampled under inference_mode, mode restored
    b = sample_images(model, RUN, labels, sampling_steps=4, sampler="ddim", seed=1, batch_size=2)
    assert np.array_equal(a, b)  # DDIM: same images whatever the batch size
    c = sample_images(model, RUN, labels, sampling_steps=4, sampler="ddim", seed=2, batch_size=5)
    assert not np.array_equal(a, c)
    d1 = sample_images(model, RUN, labels, sampling_steps=4, sampler="ddpm", seed=1, batch_size=5)
    d2 = sample_images(model, RUN, labels, sampling_steps=4, sampler="ddpm", seed=1, batch_size=5)
    assert np.array_equal(d1, d2) and not np.array_equal(d1, a)


def test_guidance_changes_samples_and_channel_choice_matters():
    model = tiny_model()
    labels = balanced_labels(4, 10)
    kw = dict(sampling_steps=3, sampler="ddim", seed=0, batch_size=4)
    plain = sample_images(model, RUN, labels, cfg_scale=1.0, **kw)
    guided = sample_images(model, RUN, labels, cfg_scale=4.0, guidance_channels="all", **kw)
    assert guided.shape == plain.shape and not np.array_equal(plain, guided)
    # with one latent channel, guiding "the first 3" and "all" is the same thing
    three = sample_images(model, RUN, labels, cfg_scale=4.0, guidance_channels=3, **kw)
    assert np.array_equal(three, guided)


def test_sample_images_decodes_latents():
    from test_autoencoder import tiny_vae

    from harness.data.autoencoder import VAEAutoencoder

    model = tiny_model(in_channels=4, input_size=2)
    ae = VAEAutoencoder("sd-vae-ft-ema", tiny_vae())
    out = sample_images(model, None, balanced_labels(3, 10), sampling_steps=2, sampler="ddpm", cfg_scale=1.5,
                        autoencoder=ae, batch_size=2)
    assert out.shape == (3, 16, 16, 3) and out.dtype == np.uint8


def test_grid_and_npz(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    grid = make_grid(images, nrow=3, pad=2)
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)
    assert np.array_equal(grid[2:10, 12:20], images[1]) and np.array_equal(grid[12:20, 2:10], images[3])
    png = save_grid(images, tmp_path / "g" / "grid.png")
    with Image.open(png) as im:
        # 8x8 samples enlarged 8x to 64x64; default rows of ceil(sqrt(5)) = 3, 2 px padding
        assert im.format == "PNG" and im.size == (3 * 66 + 2, 2 * 66 + 2)
    path = save_npz(images, [0, 1, 2, 3, 4], tmp_path / "s.npz")
    with np.load(path) as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (5, 8, 8, 3)
        assert f["arr_1"].tolist() == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "s.npz"]  # no temp files left
    with pytest.raises(ValueError):
        save_npz(images.astype(np.float32), [0] * 5, tmp_path / "bad.npz")


def _checkpoint(tmp_path: Path) -> Path:
    model = tiny_model()
    ema = tiny_model(perturb=False)
    return save_checkpoint(tmp_path / "ckpt", 7, {"model": model.state_dict(), "ema": ema.state_dict(),
                                                  "opt": {}, "step": 7, "run": RECORD})


def test_cli_sample_writes_grid_and_npz(tmp_path, capsys):
    from harness.cli import main

    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "out"
    assert main(["sample", "--checkpoint", str(ckpt), "--num-samples", "12", "--steps", "5",
                 "--batch-size", "8", "--cfg-scale", "2", "--out", str(out)]) == 0
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (12, 8, 8, 3) and f["arr_0"].dtype == np.uint8
        assert np.bincount(f["arr_1"], minlength=10).min() >= 1
    with Image.open(out / "grid.png") as im:
        assert im.mode == "RGB" and min(im.size) > 8
    assert "12 samples 8x8" in capsys.readouterr().out
    raw = tmp_path / "raw"
    assert main(["sample", "--checkpoint", str(ckpt), "--num-samples", "4", "--steps", "3", "--sampler", "ddim",
                 "--labels", "random", "--no-ema", "--out", str(raw)]) == 0
    with np.load(raw / "samples.npz") as f:
        assert f["arr_0"].shape == (4, 8, 8, 3)
    assert main(["sample", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(raw)]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
