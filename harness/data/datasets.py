"""Datasets: the embedded digits set (offline) and ImageFolder in the ImageNet train layout.

Every dataset yields `(image, label)` with `image` a float32 tensor (C, S, S) in [-1, 1] and
`label` an int. Training never reads these directly: `harness.data.autoencoder.build_latent_cache`
encodes them once (image and horizontal flip) and the trainer reads the cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from harness.errors import HarnessError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS = "digits"
DIGITS_NUM_CLASSES = 10
DIGITS_NATIVE_SIZE = 8


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits, 1,797 real images in 10 classes, no download.

    Returns images uint8 (1797, 8, 8) scaled from 0..16 to 0..255, and labels int64 (1797,).
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) -> float32 (C, H, W) in [-1, 1]."""
    if array.ndim == 2:
        array = array[:, :, None]
    x = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), rounding to the nearest level."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def list_image_files(folder: str | Path) -> list[str]:
    """Image files under `folder`, recursively (following symlinked folders), in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found += [os.path.join(dirpath, fn) for fn in sorted(filenames) if fn.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while the short side >= 2x target, BICUBIC-resize the
    short side to the target, then take the central square. Returns uint8 (S, S, 3)."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


class ImageFolder(Dataset):
    """Images under `root/<class>/**/<file>`; sorted class folder names give label ids 0..K-1.

    Items: (float32 (3, S, S) in [-1, 1], label). `flip=True` mirrors each item horizontally with
    probability 1/2 (drawn from `generator` when given, for a reproducible order).
    """

    def __init__(self, root: str | Path, image_size: int, flip: bool = False,
                 generator: torch.Generator | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise HarnessError(
                f"{self.root}: data.path is not a folder. Point data.path (or --data) at an ImageFolder "
                "root in the ImageNet train layout (one sub-folder per class, images inside).")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise HarnessError(
                f"{self.root}: no class sub-folders found (key data.path). Expected root/<class>/<image>, "
                "as in ImageNet's train split.")
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            self.samples += [(path, label) for path in list_image_files(self.root / name)]
        if not self.samples:
            raise HarnessError(f"{self.root}: class folders hold no images with extensions {IMAGE_EXTENSIONS} "
                               "(key data.path).")
        self.image_size = image_size
        self.flip = flip
        self.generator = generator
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)
        self.num_classes = len(self.classes)
        self.channels = 3
        self._identity: str | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def identity(self) -> str:
        """A fingerprint of the file list (relative paths, sizes, mtimes) for cache keys."""
        if self._identity is not None:
            return self._identity
        h = hashlib.sha256(str(self.root.resolve()).encode())
        for path, label in self.samples:
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, self.root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        self._identity = f"imagefolder:{self.root.resolve()}:{h.hexdigest()[:16]}"
        return self._identity

    def load(self, index: int) -> np.ndarray:
        """The centre-cropped uint8 (S, S, 3) image `index`."""
        path, _ = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except OSError as err:
            raise HarnessError(f"{path}: cannot read this image ({err}); remove or replace it.") from err
        return center_crop_arr(img, self.image_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = to_tensor(self.load(index))
        if self.flip and torch.rand((), generator=self.generator) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[index])


class DigitsDataset(Dataset):
    """scikit-learn's digits in pixel space: (float32 (C, S, S) in [-1, 1], label).

    Native 8x8 with one channel; `image_size` != 8 resizes with BICUBIC; `channels=3` replicates
    the grey channel (for an RGB autoencoder). `flip` as in ImageFolder.
    """

    def __init__(self, image_size: int = DIGITS_NATIVE_SIZE, channels: int = 1, flip: bool = False,
                 generator: torch.Generator | None = None) -> None:
        if channels not in (1, 3):
            raise HarnessError(f"digits: channels must be 1 or 3, got {channels}.")
        images, labels = load_digits()
        if image_size != DIGITS_NATIVE_SIZE:
            images = np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BICUBIC))
                               for im in images])
        self.images = images  # uint8 (N, S, S)
        self.labels = labels
        self.image_size = image_size
        self.channels = channels
        self.flip = flip
        self.generator = generator
        self.num_classes = DIGITS_NUM_CLASSES
        self.classes = [str(i) for i in range(DIGITS_NUM_CLASSES)]

    def __len__(self) -> int:
        return len(self.images)

    def identity(self) -> str:
        h = hashlib.sha256(self.images.tobytes() + self.labels.tobytes()).hexdigest()[:16]
        return f"digits:{h}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = to_tensor(self.images[index])
        if self.channels == 3:
            x = x.expand(3, -1, -1).clone()
        if self.flip and torch.rand((), generator=self.generator) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[index])


def dataset_channels(name_or_path: str) -> int:
    """Channels of a dataset's images: 1 for digits, 3 for an ImageFolder."""
    return 1 if str(name_or_path) == DIGITS else 3


def open_dataset(name_or_path: str | Path, image_size: int, channels: int | None = None,
                 flip: bool = False, generator: torch.Generator | None = None) -> DigitsDataset | ImageFolder:
    """'digits' or an ImageFolder root -> a dataset of (float32 (C, S, S) in [-1, 1], label).

    `channels` defaults to the dataset's own (1 for digits, 3 for images); 3 replicates grey.
    """
    if str(name_or_path) == DIGITS:
        return DigitsDataset(image_size, channels or 1, flip=flip, generator=generator)
    if channels not in (None, 3):
        raise HarnessError(f"{name_or_path}: ImageFolder images are RGB; channels={channels} is not supported.")
    if not Path(name_or_path).expanduser().exists():
        raise HarnessError(
            f"{name_or_path}: no such dataset (key data.dataset/data.path, or --data). Use 'digits' for the "
            "embedded set, or the path of an ImageFolder root in the ImageNet train layout.")
    return ImageFolder(name_or_path, image_size, flip=flip, generator=generator)
