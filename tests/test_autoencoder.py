"""The latent stage: a tiny real AutoencoderKL, weight loading, missing weights, the latent cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data.autoencoder import (SD_SCALE, IdentityAutoencoder, LatentCache, VAEAutoencoder, build_latent_cache,
                                 latent_shape, load_autoencoder)
from harness.data.datasets import DigitsDataset, ImageFolder
from harness.errors import HarnessError
from tolerance import fp16_bound, fp32_bound, scale


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=16)


class Counting:
    """Wraps an autoencoder and counts encode calls (the thing under test stays real)."""

    def __init__(self, ae, fail_after: int | None = None):
        self.ae, self.calls, self.fail_after = ae, 0, fail_after
        for attr in ("name", "latent_channels", "downsample", "fingerprint"):
            setattr(self, attr, getattr(ae, attr))
        self.scale = getattr(ae, "scale", 1.0)

    def to(self, device):
        self.ae.to(device)
        return self

    def encode(self, x, generator=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.ae.encode(x, generator)


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    return tmp_path / "imgs"


def test_tiny_vae_encodes_and_decodes():
    ae = VAEAutoencoder("sd-vae-ft-ema", tiny_vae())
    assert ae.latent_channels == 4 and ae.downsample == 8
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = ae.encode(x, torch.Generator().manual_seed(1))
    assert z.shape == (2, 4, 2, 2)
    # a scaled posterior sample: same generator, same draw, times 0.18215 (the same ops: bitwise)
    post = ae.vae.encode(x).latent_dist
    expected = post.sample(generator=torch.Generator().manual_seed(1)) * SD_SCALE
    assert torch.equal(z, expected)
    out = ae.decode(z)
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, ae.vae.decode(z / SD_SCALE).sample.clamp(-1, 1))
    assert latent_shape(ae, 256, 3) == (4, 32, 32)
    with pytest.raises(HarnessError, match="not divisible"):
        latent_shape(ae, 20, 3)


def test_identity_autoencoder():
    ae = load_autoencoder("identity")
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.equal(ae.encode(x), x) and torch.equal(ae.decode(x), x)
    assert latent_shape(ae, 8, 1) == (1, 8, 8)
    with pytest.raises(HarnessError, match="unknown autoencoder"):
        load_autoencoder("sd-vae-ft-nope")


def test_loads_weights_from_a_local_folder(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae-weights")
    ae = load_autoencoder("sd-vae-ft-mse", path=tmp_path / "vae-weights")
    ref = VAEAutoencoder("sd-vae-ft-mse", vae)
    assert ae.fingerprint == ref.fingerprint
    z = torch.randn(1, 4, 2, 2)
    assert torch.equal(ae.decode(z), ref.decode(z))   # bitwise-equal weights, the same ops
    other = VAEAutoencoder("sd-vae-ft-mse", tiny_vae().requires_grad_(False).apply(
        lambda m: [p.add_(0.1) for p in m.parameters(recurse=False)]))
    assert other.fingerprint != ref.fingerprint


def test_missing_weights_name_path_and_fetch_command(tmp_path):
    missing = tmp_path / "no-vae-here"
    with pytest.raises(HarnessError) as err:
        load_autoencoder("sd-vae-ft-ema", path=missing)
    msg = str(err.value)
    assert str(missing) in msg and "hf download stabilityai/sd-vae-ft-ema --local-dir" in msg
    assert "--autoencoder-path" in msg


def test_missing_weights_in_hub_cache_says_how_to_fetch():
    from huggingface_hub.constants import HF_HUB_CACHE

    expected = Path(HF_HUB_CACHE) / "models--stabilityai--sd-vae-ft-mse"
    if expected.exists():
        pytest.skip("the real sd-vae-ft-mse is in this machine's Hugging Face cache")
    with pytest.raises(HarnessError) as err:
        load_autoencoder("sd-vae-ft-mse")
    msg = str(err.value)
    assert str(expected) in msg and "--allow-download" in msg and "hf download stabilityai/sd-vae-ft-mse" in msg


def test_digits_identity_cache_is_built_once(cache_root):
    ae = Counting(IdentityAutoencoder())
    cache = build_latent_cache("digits", ae, 8, batch_size=512)
    assert ae.calls == 2 * 4  # 4 batches of 512, image and flip
    latents, labels = cache.arrays()
    assert latents.shape == (1797, 2, 1, 8, 8) and latents.dtype == np.float32
    assert cache.manifest["dtype"] == "float32" and cache.latent_shape == (1, 8, 8)
    ds = DigitsDataset()
    assert np.array_equal(latents[7, 0], ds[7][0].numpy())
    assert np.array_equal(latents[7, 1], ds[7][0].flip(-1).numpy())
    assert np.array_equal(labels, ds.labels)
    assert Path(cache.root).is_relative_to(cache_root / "latents")
    again = build_latent_cache("digits", ae, 8, batch_size=512)
    assert ae.calls == 8  # found, not re-encoded
    assert again.root == cache.root


def test_vae_cache_shards_flips_and_reuse(image_folder):
    ae = Counting(VAEAutoencoder("sd-vae-ft-ema", tiny_vae()))
    cache = build_latent_cache(image_folder, ae, 16, batch_size=2, shard_size=4)
    assert ae.calls == 2 * 3  # 3 batches (2 + 1 in shard 0, 1 in shard 1... ) x image and flip
    assert [s["count"] for s in cache.manifest["shards"]] == [4, 2]
    latents, labels = cache.arrays()
    assert latents.shape == (6, 2, 4, 2, 2) and latents.dtype == np.float16
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and cache.manifest["classes"] == ["cat", "dog"]
    # indexing across shards agrees with the shards themselves
    full = np.asarray(latents)
    idx = np.array([5, 0, 4, 3])
    flips = np.array([1, 0, 0, 1])
    assert np.array_equal(latents[idx], full[idx])
    assert np.array_equal(latents[idx, flips], full[idx, flips])
    assert np.array_equal(latents[2:5], full[2:5]) and np.array_equal(latents[-1], full[5])
    assert torch.equal(cache.batch(idx, flips), torch.from_numpy(full[idx, flips].astype(np.float32)))
    # the flip half is the encoding of the mirrored image (posterior mean close, not the mirrored latent)
    x = ImageFolder(image_folder, 16)[4][0][None]
    mean_flip = ae.ae.vae.encode(x.flip(-1)).latent_dist.mean * SD_SCALE
    std_flip = ae.ae.vae.encode(x.flip(-1)).latent_dist.std * SD_SCALE
    # 6 posterior standard deviations, plus the float16 storage (one rounding, relative) and the batch of 2 vs 1
    # (float32 roundings in another order, FORWARD as in test_interop), both at the latents' scale
    slack = (fp16_bound(1) + fp32_bound(64)) * scale(full[4, 1])
    dev = np.abs(full[4, 1] - mean_flip[0].detach().numpy()) - 6 * std_flip[0].detach().numpy()
    assert (dev <= slack).all()
    # a second call (another run of the sweep) reuses it
    assert build_latent_cache(image_folder, ae, 16, batch_size=2, shard_size=4).root == cache.root
    assert ae.calls == 6
    # the torch dataset: float32 latents, flips drawn from the trainer's generator
    ds = cache.dataset(torch.Generator().manual_seed(0))
    z, y = ds[3]
    assert z.dtype == torch.float32 and z.shape == (4, 2, 2) and y == 1
    ds = cache.dataset(torch.Generator().manual_seed(0))
    draws = [ds[3][0] for _ in range(20)]
    ds2 = cache.dataset(torch.Generator().manual_seed(0))
    assert all(torch.equal(a, ds2[3][0]) for a in draws)
    halves = {0 if torch.equal(d, torch.from_numpy(full[3, 0].astype(np.float32))) else 1 for d in draws}
    assert halves == {0, 1}


def test_crash_mid_build_leaves_no_cache_and_resumes(image_folder, cache_root, monkeypatch):
    vae = tiny_vae()
    crashing = Counting(VAEAutoencoder("sd-vae-ft-ema", vae), fail_after=4)  # dies in shard 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_latent_cache(image_folder, crashing, 16, batch_size=2, shard_size=4)
    roots = list((cache_root / "latents").iterdir())
    assert len(roots) == 1 and not (roots[0] / "manifest.json").exists()
    with pytest.raises(HarnessError, match="rebuild the cache"):
        LatentCache.open(roots[0])
    resumed = Counting(VAEAutoencoder("sd-vae-ft-ema", vae))
    cache = build_latent_cache(image_folder, resumed, 16, batch_size=2, shard_size=4)
    assert resumed.calls == 2  # only the unfinished shard (one batch, image and flip)
    assert (cache.root / "manifest.json").exists()
    # same result as an uninterrupted build (posterior noise is seeded per shard)
    fresh_root = cache_root / "fresh"
    monkeypatch.setenv("HARNESS_CACHE", str(fresh_root))
    fresh = build_latent_cache(image_folder, VAEAutoencoder("sd-vae-ft-ema", vae), 16, batch_size=2, shard_size=4)
    assert np.array_equal(np.asarray(fresh.arrays()[0]), np.asarray(cache.arrays()[0]))


def test_cli_latents(capsys):
    from harness.cli import main

    assert main(["latents", "--data", "digits", "--autoencoder", "identity", "--image-size", "8",
                 "--batch-size", "1024"]) == 0
    out = capsys.readouterr().out
    assert "1797 images x 2 flips" in out and "(1, 8, 8) float32" in out
    assert main(["latents", "--data", "digits", "--autoencoder", "sd-vae-ft-ema",
                 "--autoencoder-path", "/nonexistent/vae"]) == 2
    assert "hf download" in capsys.readouterr().err


def _shards(cache) -> list[np.ndarray]:
    return [np.load(cache.root / s["file"]) for s in cache.manifest["shards"]]


@pytest.mark.slow
def test_sharded_build_equals_one_process_whatever_the_workers(image_folder, cache_root, monkeypatch):
    vae = tiny_vae()
    one = build_latent_cache(image_folder, VAEAutoencoder("sd-vae-ft-ema", vae), 16, batch_size=2, shard_size=2,
                             num_workers=0)
    monkeypatch.setenv("HARNESS_CACHE", str(cache_root / "two"))
    task0 = Counting(VAEAutoencoder("sd-vae-ft-ema", vae))
    assert build_latent_cache(image_folder, task0, 16, batch_size=2, shard_size=2, num_workers=1, task=(0, 2)) is None
    assert task0.calls == 2 * 2  # shards 0 and 2 of 3, one batch each, image and flip
    two = build_latent_cache(image_folder, VAEAutoencoder("sd-vae-ft-ema", vae), 16, batch_size=2, shard_size=2,
                             num_workers=1, task=(1, 2))
    assert two is not None and two.manifest == one.manifest and two.root.name == one.root.name
    assert len(_shards(one)) == 3
    for a, b in zip(_shards(one), _shards(two)):
        assert np.array_equal(a, b)
    assert not np.array_equal(_shards(one)[0], _shards(one)[1])  # shards differ: the check can fail
    with pytest.raises(HarnessError, match="0 <= I < N"):
        build_latent_cache(image_folder, task0, 16, task=(2, 2))


@pytest.mark.slow
def test_cli_latents_tasks_and_shards(image_folder, tmp_path, capsys):
    from harness.cli import main

    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    args = ["latents", "--data", str(image_folder), "--autoencoder", "sd-vae-ft-ema", "--autoencoder-path",
            str(vae_dir), "--image-size", "16", "--batch-size", "2"]
    assert main([*args, "--shard", "1/2", "--workers", "0"]) == 0
    assert "other tasks' are still missing" in capsys.readouterr().out
    assert main([*args, "--shard", "2/2"]) == 2 and "0 <= I < N" in capsys.readouterr().err
    assert main([*args, "--shard", "1/2", "--tasks", "2"]) == 2 and "give one of the two" in capsys.readouterr().err
    assert main([*args, "--tasks", "2", "--workers", "0"]) == 0  # two real processes, then the manifest
    assert "6 images x 2 flips, latents (4, 2, 2) float16" in capsys.readouterr().out


def test_two_sizes_of_one_image_folder_are_two_caches(image_folder, cache_root):
    """An ImageFolder's identity (its file list) does not change with the size, so the cache key itself
    must hold it (issue 28, finding 7): 8 px and 16 px are two caches, each reused at its own size."""
    from harness.data.autoencoder import cache_key

    ae = Counting(IdentityAutoencoder())
    small = build_latent_cache(image_folder, ae, 8, batch_size=8)
    large = build_latent_cache(image_folder, ae, 16, batch_size=8)
    assert small.root != large.root and ae.calls == 2 * 2
    assert small.arrays()[0].shape == (6, 2, 3, 8, 8) and large.arrays()[0].shape == (6, 2, 3, 16, 16)
    assert build_latent_cache(image_folder, ae, 8, batch_size=8).root == small.root and ae.calls == 4
    # the hash itself, not only the readable name, tells the sizes apart
    identity = ImageFolder(image_folder, 8).identity()
    assert identity == ImageFolder(image_folder, 16).identity()
    digests = {cache_key(identity, IdentityAutoencoder(), size, 3).rsplit("_", 1)[1] for size in (8, 16)}
    assert len(digests) == 2
