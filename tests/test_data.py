"""Datasets: digits in pixel space, ImageFolder labels and ADM's centre crop."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data.datasets import (DigitsDataset, ImageFolder, center_crop_arr, dataset_channels, load_digits,
                          open_dataset, to_tensor, to_uint8)
from harness.errors import HarnessError


def test_load_digits_contract():
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.max() == 255 and images.min() == 0
    assert set(labels.tolist()) == set(range(10))


def test_digits_dataset_pixel_space():
    ds = DigitsDataset()
    x, y = ds[5]
    images, labels = load_digits()
    assert len(ds) == 1797 and ds.num_classes == 10
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert y == labels[5]
    # [-1, 1] maps back to the same uint8 pixels
    assert np.array_equal(to_uint8(x[None])[0, :, :, 0], images[5])
    rgb, _ = DigitsDataset(channels=3)[5]
    assert rgb.shape == (3, 8, 8) and torch.equal(rgb[0], rgb[2]) and torch.equal(rgb[1], x[0])
    big, _ = DigitsDataset(image_size=16)[5]
    assert big.shape == (1, 16, 16)


def test_digits_flip_follows_generator():
    a = DigitsDataset(flip=True, generator=torch.Generator().manual_seed(3))
    b = DigitsDataset(flip=True, generator=torch.Generator().manual_seed(3))
    plain = DigitsDataset()
    xs = [a[0][0] for _ in range(20)]
    assert all(torch.equal(x, b[0][0]) for x in xs)  # same seed, same flips
    flipped = [torch.equal(x, plain[0][0].flip(-1)) for x in xs]
    kept = [torch.equal(x, plain[0][0]) for x in xs]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_center_crop_takes_the_centre():
    arr = np.zeros((64, 160, 3), dtype=np.uint8)
    arr[:, :40] = (255, 0, 0)  # a red band at the left edge, outside the central square
    arr[24:40, 72:88] = (0, 0, 255)  # a blue square in the middle
    out = center_crop_arr(Image.fromarray(arr), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[..., 0].max() < 30  # no red
    assert out[16, 16, 2] > 200  # blue centre


def test_center_crop_follows_adm_steps():
    # 384x256 -> 32: BOX-halve three times (192x128, 96x64, 48x32), bicubic to short side 32 (a no-op
    # here), then the central 32 columns. A single bicubic resize gives different pixels.
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (256, 384, 3), dtype=np.uint8))
    out = center_crop_arr(img, 32)
    halved = img
    for size in ((192, 128), (96, 64), (48, 32)):
        halved = halved.resize(size, Image.BOX)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out, np.asarray(halved)[:, 8:40])
    direct = np.asarray(img.resize((48, 32), Image.BICUBIC))[:, 8:40]
    assert not np.array_equal(out, direct)
    # odd sizes: 100x70 -> halve once (70 >= 64) -> 50x35 -> bicubic 46x32 -> crop columns 7:39
    odd = Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8))
    step = odd.resize((50, 35), Image.BOX).resize((46, 32), Image.BICUBIC)
    assert np.array_equal(center_crop_arr(odd, 32), np.asarray(step)[:, 7:39])


def _write_folder(root, sizes=((40, 30), (30, 50), (32, 32))):
    for cls in ("zebra", "apple"):
        sub = root / cls / "nested"
        sub.mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            colour = (200, 10, 10) if cls == "apple" else (10, 10, 200)
            Image.new("RGB", (w, h), colour).save(sub / f"{i}.png")
        (root / cls / "notes.txt").write_text("not an image")


def test_image_folder_labels_and_items(tmp_path):
    _write_folder(tmp_path)
    ds = ImageFolder(tmp_path, image_size=16)
    assert ds.classes == ["apple", "zebra"] and ds.num_classes == 2
    assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y == 1
    assert x[2].mean() > 0.5 and x[0].mean() < -0.5  # blue zebra
    assert ds.identity() == ImageFolder(tmp_path, 16).identity()
    assert open_dataset(tmp_path, 16).identity() == ds.identity()
    assert dataset_channels(str(tmp_path)) == 3 and dataset_channels("digits") == 1


def test_image_folder_flip(tmp_path):
    sub = tmp_path / "only"
    sub.mkdir()
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, :4] = 255
    Image.fromarray(arr).save(sub / "a.png")
    ds = ImageFolder(tmp_path, 16, flip=True, generator=torch.Generator().manual_seed(0))
    seen = {bool(ds[0][0][0, 0, 0] > 0) for _ in range(30)}
    assert seen == {True, False}
    assert torch.equal(ImageFolder(tmp_path, 16)[0][0], to_tensor(arr))


def test_missing_dataset_errors(tmp_path):
    with pytest.raises(HarnessError, match="no such dataset"):
        open_dataset(tmp_path / "nope", 16)
    with pytest.raises(HarnessError, match="no class sub-folders"):
        ImageFolder(tmp_path, 16)
