"""The latent stage: Stable Diffusion's VAE (through diffusers) or the identity, and the latent cache.

Latents are pre-extracted once per (dataset, autoencoder, image size), for each image and its
horizontal flip, into memory-mapped .npy shards that every run of a sweep shares; training never
runs the VAE. Storage dtype: float16 for VAE latents (scaled to about unit variance, so float16
loses nothing that matters and halves the ImageNet cache to ~21 GB at 256px), float32 for the
identity (pixel values, exact).

Cache layout under `harness.io.cache_dir("latents", key)`:
  shard_00000.npy ...   float16|float32 (n, 2, C, h, w): [:, 0] the image, [:, 1] its flip
  labels.npy            int64 (N,)
  manifest.json         written last and atomically: a folder without it is not a cache
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from harness.errors import HarnessError
from harness.io import atomic_write, atomic_write_json, cache_dir, file_lock
from harness.data.datasets import dataset_channels, open_dataset, to_uint8
from harness.models.compiled import autocast

log = logging.getLogger(__name__)

SD_SCALE = 0.18215  # Stable Diffusion's latent scale (the paper's, and diffusers' default)
VAE_REPOS = {"sd-vae-ft-ema": "stabilityai/sd-vae-ft-ema", "sd-vae-ft-mse": "stabilityai/sd-vae-ft-mse"}
AUTOENCODERS = ("identity", *VAE_REPOS)
CACHE_VERSION = 1
SHARD_SIZE = 16384  # images per shard (~256 MB at 256px in float16)
#: tests only: seconds to sleep after writing each shard, so a latent job can be killed mid-way
SHARD_DELAY_ENV = "HARNESS_TEST_SHARD_DELAY_S"


class Autoencoder:
    """Maps images (N, C_img, H, W) in [-1, 1] to latents (N, latent_channels, H/f, W/f) and back."""

    name: str
    latent_channels: int | None  # None: the data's own channels (identity)
    downsample: int
    fingerprint: str  # identifies the weights, for cache keys

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: str | torch.device) -> "Autoencoder":
        return self


class IdentityAutoencoder(Autoencoder):
    """Pixel space: encode and decode return their input; channels are the data's own."""

    name = "identity"
    latent_channels = None
    downsample = 1
    fingerprint = "identity"

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(-1.0, 1.0)


class VAEAutoencoder(Autoencoder):
    """A diffusers AutoencoderKL; latents are a posterior sample times 0.18215 (as DiT trains)."""

    def __init__(self, name: str, vae: Any, scale: float = SD_SCALE) -> None:
        self.name = name
        self.vae = vae.eval().requires_grad_(False)
        self.scale = scale
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}  # not paths, versions
        h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        with torch.no_grad():
            for tensor in vae.state_dict().values():  # cheap content digest: sums and a few values
                t = tensor.detach().double().flatten()
                h.update(np.float64(t.sum().item()).tobytes() + t[:8].cpu().numpy().tobytes())
        self.fingerprint = h.hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def to(self, device: str | torch.device) -> "VAEAutoencoder":
        self.vae.to(device)
        return self

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x (N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/f, W/f)."""
        if x.shape[1] != 3:
            raise HarnessError(f"autoencoder {self.name} takes RGB images, got {x.shape[1]} channels.")
        posterior = self.vae.encode(x.to(self.device, torch.float32)).latent_dist
        return posterior.sample(generator=generator) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images (N, 3, h*f, w*f) in [-1, 1]."""
        return self.vae.decode(z.to(self.device, torch.float32) / self.scale).sample.clamp(-1.0, 1.0)


def decode_uint8(ae: Any, z: torch.Tensor, device: torch.device, precision: str) -> np.ndarray:
    """Latents (N, C, h, w) -> uint8 images (N, H, W, 3), decoded under `precision`'s autocast; grey
    replicated to RGB. The one decode of sampling and of the decode-batch probe."""
    with autocast(device, precision):
        images = ae.decode(z).float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return to_uint8(images)


#: Stable Diffusion's VAE architecture (sd-vae-ft-ema/mse share it): `harness bench` times it with
#: random weights when no weights are at hand (the speed does not depend on the values)
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=256)


def fetch_command(name: str, local_dir: str | Path) -> str:
    return (f"`hf download {VAE_REPOS[name]} --local-dir {local_dir}` "
            f"(older huggingface_hub: `huggingface-cli download {VAE_REPOS[name]} --local-dir {local_dir}`)")


def locate_vae(name: str, path: str | Path | None) -> Path | None:
    """The folder of an SD VAE's weights (`path`, or its vae/ subfolder), or None when the Hugging Face
    cache holds them; HarnessError saying how to get them when neither does. Opens no weights."""
    if path is None:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        if isinstance(try_to_load_from_cache(VAE_REPOS[name], "config.json"), str):
            return None
        expected = Path(HF_HUB_CACHE) / ("models--" + VAE_REPOS[name].replace("/", "--"))
        raise HarnessError(
            f"{expected}: the {name} weights are not in the Hugging Face cache (key data.autoencoder_path is "
            f"unset). Fix: on a machine with internet run {fetch_command(name, 'sd-vae')} and set "
            "data.autoencoder_path (or --autoencoder-path) to that folder.")
    folder = Path(path).expanduser()
    if (folder / "vae" / "config.json").exists() and not (folder / "config.json").exists():
        folder = folder / "vae"  # a full Stable Diffusion checkpoint folder
    weights = [folder / f"diffusion_pytorch_model.{ext}" for ext in ("safetensors", "bin")]
    if not (folder / "config.json").exists() or not any(w.exists() for w in weights):
        raise HarnessError(
            f"{folder}: no {name} weights here (expected config.json and diffusion_pytorch_model."
            f"safetensors; key data.autoencoder_path / --autoencoder-path). Fix: on a machine with internet run "
            f"{fetch_command(name, folder)} and copy the folder to this path.")
    return folder


def load_autoencoder(name: str, path: str | Path | None = None, allow_download: bool = False) -> Autoencoder:
    """'identity', or an SD VAE from a local folder (`path`) or the Hugging Face cache.

    No network unless `allow_download`; missing weights raise HarnessError saying how to get them.
    """
    if name == "identity":
        return IdentityAutoencoder()
    if name not in VAE_REPOS:
        raise HarnessError(f"unknown autoencoder {name!r} (key data.autoencoder / --autoencoder); "
                           f"choose one of {', '.join(AUTOENCODERS)}.")
    from diffusers import AutoencoderKL

    if path is not None:
        folder = locate_vae(name, path)
        try:
            vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise HarnessError(f"{folder}: cannot load the {name} weights ({err}). Re-fetch them with "
                               f"{fetch_command(name, folder)}.") from err
        return VAEAutoencoder(name, vae)
    try:
        vae = AutoencoderKL.from_pretrained(VAE_REPOS[name], local_files_only=not allow_download)
    except (OSError, ValueError) as err:
        from huggingface_hub.constants import HF_HUB_CACHE

        expected = Path(HF_HUB_CACHE) / ("models--" + VAE_REPOS[name].replace("/", "--"))
        how = ("the download failed; check the network" if allow_download else
               "pass --allow-download to fetch it from the Hugging Face hub")
        raise HarnessError(
            f"{expected}: the {name} weights are not in the Hugging Face cache (key data.autoencoder_path is "
            f"unset). Fix: either {how}, or on a machine with internet run {fetch_command(name, 'sd-vae')} "
            f"and set data.autoencoder_path (or --autoencoder-path) to that folder.") from err
    return VAEAutoencoder(name, vae)


def latent_shape(autoencoder: Autoencoder, image_size: int, data_channels: int) -> tuple[int, int, int]:
    """(C, h, w) of the latents of `image_size` images with `data_channels` channels."""
    if image_size % autoencoder.downsample:
        raise HarnessError(f"data.image_size={image_size} is not divisible by the {autoencoder.name} "
                           f"autoencoder's downsampling factor {autoencoder.downsample}; pick a multiple.")
    side = image_size // autoencoder.downsample
    return (autoencoder.latent_channels or data_channels, side, side)


class ShardedArray:
    """Read-only (N, 2, C, h, w) view over memory-mapped shards; indexing returns numpy arrays.

    Supports `a[i]`, `a[start:stop]`, `a[index_array]` and `a[index_array, flip_array]`.
    """

    def __init__(self, shards: list[np.ndarray]) -> None:
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])
        self.shape = (int(self.starts[-1]), *shards[0].shape[1:])
        self.dtype = shards[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} items")
        out = np.empty((idx.size, *self.shape[1:]), dtype=self.dtype)
        which = np.searchsorted(self.starts, idx.ravel(), side="right") - 1
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.shards[s][idx.ravel()[mask] - self.starts[s]]
        return out.reshape(*idx.shape, *self.shape[1:])

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, slice):
            rows = self._rows(np.arange(len(self))[key])
            return rows[(slice(None), *rest)] if rest else rows
        rows = self._rows(key)
        if rest and np.ndim(key) == 1:
            return rows[(np.arange(len(rows)), *rest)]
        return rows[rest] if rest else rows

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate([np.asarray(s) for s in self.shards])
        return out.astype(dtype) if dtype is not None else out


class LatentDataset(Dataset):
    """(latent float32 (C, h, w), label); the flip is drawn per item from `generator` if `flip`."""

    def __init__(self, cache: "LatentCache", generator: torch.Generator | None = None, flip: bool = True) -> None:
        self.latents, self.labels = cache.arrays()
        self.generator = generator
        self.flip = flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        f = int(torch.randint(2, (), generator=self.generator)) if self.flip else 0
        return torch.from_numpy(self.latents[index, f].astype(np.float32)), int(self.labels[index])


@dataclass
class LatentCache:
    """A finished cache folder and its manifest."""

    root: Path
    manifest: dict
    _arrays: tuple[ShardedArray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, root: str | Path) -> "LatentCache":
        root = Path(root)
        path = root / "manifest.json"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise HarnessError(f"{path}: no valid latent-cache manifest ({err}); rebuild the cache with "
                               "`harness latents --data ... --autoencoder ...`.") from err
        return cls(root, manifest)

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["latent_shape"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def arrays(self) -> tuple[ShardedArray, np.ndarray]:
        """(latents (N, 2, C, h, w) memory-mapped, [:, 1] = flipped image; labels int64 (N,))."""
        if self._arrays is None:
            shards = [np.load(self.root / s["file"], mmap_mode="r") for s in self.manifest["shards"]]
            self._arrays = (ShardedArray(shards), np.load(self.root / "labels.npy"))
        return self._arrays

    def batch(self, indices: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """float32 (B, C, h, w) latents of items `indices`, flipped where `flips` is 1."""
        latents, _ = self.arrays()
        return torch.from_numpy(latents[np.asarray(indices), np.asarray(flips)].astype(np.float32))

    def dataset(self, generator: torch.Generator | None = None, flip: bool = True) -> LatentDataset:
        return LatentDataset(self, generator, flip)


def _is_complete(root: Path) -> bool:
    try:
        cache = LatentCache.open(root)
        return cache.manifest.get("version") == CACHE_VERSION and all(
            (root / s["file"]).exists() for s in cache.manifest["shards"])
    except HarnessError:
        return False


def cache_key(dataset_identity: str, autoencoder: Autoencoder, image_size: int, channels: int) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "data": dataset_identity, "ae": autoencoder.name,
                       "weights": autoencoder.fingerprint, "size": image_size, "channels": channels},
                      sort_keys=True)
    tag = "digits" if dataset_identity.startswith("digits") else Path(dataset_identity.split(":")[1]).name
    return f"{tag}_{autoencoder.name}_{image_size}px_{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def loader_workers() -> int:
    """DataLoader workers for one encoding task: the task's CPUs (Slurm's cpus_per_task, else this
    process's CPU affinity) less the one that drives the encoder."""
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))
    return max(0, cpus - 1)


def _shard_done(path: Path, shape: tuple) -> bool:
    try:
        return np.load(path, mmap_mode="r").shape == shape
    except (OSError, ValueError):
        return False


def _encode_shards(data: Dataset, ae: Autoencoder, todo: list[tuple[int, int, int]], root: Path, shape: tuple,
                   dtype: Any, seed: int, batch_size: int, num_workers: int, device: torch.device) -> None:
    """Encode shards [(index, start, stop)] of `data` and write each atomically when complete.

    One DataLoader over every batch of every shard (no batch straddles two shards), so the workers
    stay busy across shard boundaries; the VAE posterior noise of shard s comes from a generator
    seeded by (seed, s), so a shard's content does not depend on which task or worker built it.
    On a GPU the encoder runs under bf16 autocast.
    """
    from tqdm import tqdm

    batches = [(s, list(range(b, min(b + batch_size, stop)))) for s, start, stop in todo
               for b in range(start, stop, batch_size)]
    loader = DataLoader(data, batch_sampler=[idx for _, idx in batches], num_workers=num_workers)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bounds = {s: (start, stop) for s, start, stop in todo}
    out, gen, pos = None, None, 0
    with torch.inference_mode(), autocast:
        for (s, idx), (x, _) in zip(batches, tqdm(loader, desc="latents", disable=len(batches) < 10)):
            start, stop = bounds[s]
            if idx[0] == start:  # a shard begins
                out, pos = np.empty((stop - start, 2, *shape), dtype=dtype), 0
                gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + s)
            x = x.to(device, non_blocking=True)
            both = torch.stack([ae.encode(x, gen), ae.encode(x.flip(-1), gen)], dim=1)
            out[pos : pos + len(x)] = both.float().cpu().numpy().astype(dtype)
            pos += len(x)
            if idx[-1] == stop - 1:
                atomic_write(root / f"shard_{s:05d}.npy", lambda f: np.save(f, out))
                time.sleep(float(os.environ.get(SHARD_DELAY_ENV, 0)))


def build_latent_cache(dataset_name_or_path: str | Path, autoencoder: Autoencoder | str, image_size: int,
                       batch_size: int = 32, device: str | torch.device | None = None, seed: int = 0,
                       shard_size: int = SHARD_SIZE, num_workers: int | None = None,
                       task: tuple[int, int] = (0, 1)) -> LatentCache | None:
    """Encode every image and its horizontal flip once; later calls find the cache and return it.

    task (i, n): encode only shards s with s % n == i (one of n tasks, e.g. one per GPU); the task
    that finds every shard written writes labels and the manifest, and returns the cache; the others
    return None. Shards are written atomically, so an interrupted build resumes from its finished
    shards; the manifest is written last. num_workers: DataLoader workers (default: loader_workers()).
    """
    i, n = task
    if not (n >= 1 and 0 <= i < n):
        raise HarnessError(f"latent task {i}/{n} (--shard I/N): use 0 <= I < N.")
    ae = load_autoencoder(autoencoder) if isinstance(autoencoder, str) else autoencoder
    channels = dataset_channels(str(dataset_name_or_path)) if ae.latent_channels is None else 3
    shape = latent_shape(ae, image_size, channels)
    data = open_dataset(dataset_name_or_path, image_size, channels=channels, flip=False)
    root = cache_dir("latents", cache_key(data.identity(), ae, image_size, channels))
    if _is_complete(root):
        log.info("latent cache %s: reusing (%d items)", root, len(data))
        return LatentCache.open(root)
    bounds = [(s, start, min(start + shard_size, len(data))) for s, start in enumerate(range(0, len(data), shard_size))]
    with file_lock(root / (".lock" if n == 1 else f".lock-{i}-of-{n}")):
        if _is_complete(root):  # another job finished it while we waited
            return LatentCache.open(root)
        todo = [b for b in bounds[i::n] if not _shard_done(root / f"shard_{b[0]:05d}.npy", (b[2] - b[1], 2, *shape))]
        if todo:
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            workers = loader_workers() if num_workers is None else num_workers
            log.info("latent task %d/%d: %d of its %d shards to encode on %s with %d loader workers", i, n,
                     len(todo), len(bounds[i::n]), device, workers)
            ae.to(device)
            dtype = np.float32 if ae.latent_channels is None else np.float16
            _encode_shards(data, ae, todo, root, shape, dtype, seed, batch_size, workers, device)
    missing = [s for s, start, stop in bounds if not _shard_done(root / f"shard_{s:05d}.npy", (stop - start, 2, *shape))]
    if missing:
        log.info("latent task %d/%d done; %d shards are left to the other tasks", i, n, len(missing))
        return None
    atomic_write(root / "labels.npy", lambda f: np.save(f, data.labels.astype(np.int64)))
    dtype = np.float32 if ae.latent_channels is None else np.float16
    manifest = {
        "version": CACHE_VERSION, "dataset": str(dataset_name_or_path), "dataset_identity": data.identity(),
        "autoencoder": ae.name, "autoencoder_fingerprint": ae.fingerprint, "image_size": image_size,
        "image_channels": channels, "latent_shape": list(shape), "dtype": np.dtype(dtype).name,
        "num_items": len(data), "num_classes": data.num_classes, "classes": list(data.classes),
        "scale": getattr(ae, "scale", 1.0), "seed": seed,
        "shards": [{"file": f"shard_{s:05d}.npy", "start": start, "count": stop - start} for s, start, stop in bounds],
    }
    atomic_write_json(root / "manifest.json", manifest)
    log.info("latent cache %s: built %d items x 2 flips, latents %s %s", root, len(data), shape, manifest["dtype"])
    return LatentCache(root, manifest)
