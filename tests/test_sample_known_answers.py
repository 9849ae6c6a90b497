"""harness.sampling.sample against known answers: sample_images rebuilt from its primitives (per-sample noise
seeds, the batch generator, harness.sampling.samplers.sample_loop, guided_model_fn, decode, to_uint8) and
compared exactly; the label helpers, the grid and npz writers, checkpoint loading and `harness sample`
with their exact outputs and error messages. Tiny models (DiT-2x32x2/2, 8x8 digits, 2-4 steps)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import harness.sampling.sample
from harness.data.autoencoder import IdentityAutoencoder, VAEAutoencoder
from harness.models.checkpoint import save_checkpoint
from harness.cli import build_parser, main
from harness.data.datasets import to_uint8
from harness.models.diffusion import guided_model_fn
from harness.errors import HarnessError
from harness.models.dit import build_model
from harness.config.spec import RunSpec
from harness.config.vocab import SAMPLERS
from harness.models.runmodel import model_from_checkpoint
from harness.sampling.sample import (_channels_arg, _sample_seed, autoencoder_for, balanced_labels, cli_sample,
                                     make_grid, random_labels, sample_images, save_grid, save_npz)
from harness.sampling.samplers import sample_loop
from train_tiny import nudged_tiny_dit

MODEL = "DiT-2x32x2/2"
#: a checkpoint's run record as tests write it: partial, like one from before a key existed
RECORD = {"model": MODEL, "conditioning": "adaLN-Zero", "seed": 0,
          "data": {"dataset": "digits", "path": None, "image_size": 8, "autoencoder": "identity",
                   "autoencoder_path": None, "num_classes": 10},
          "train": {"class_dropout": 0.1}}
RUN = RunSpec.from_dict(RECORD, required=("model",))
DEFAULT = object()  # "leave the argument out"


@pytest.fixture(autouse=True)
def _fresh_autoencoder_cache():
    """autoencoder_for caches per process: each test starts empty, and the cache is put back after."""
    saved = dict(harness.sampling.sample._AUTOENCODERS)
    harness.sampling.sample._AUTOENCODERS.clear()
    yield
    harness.sampling.sample._AUTOENCODERS.clear()
    harness.sampling.sample._AUTOENCODERS.update(saved)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """A tiny SD-architecture VAE (4 latent channels, downsampling 8) saved as a local weights folder."""
    from test_autoencoder import tiny_vae

    folder = tmp_path_factory.mktemp("vae") / "sd-vae"
    tiny_vae().save_pretrained(str(folder))
    return folder


def tiny_vae_ae() -> VAEAutoencoder:
    from test_autoencoder import tiny_vae

    return VAEAutoencoder("sd-vae-ft-ema", tiny_vae())


def vae_run(vae_dir: Path) -> RunSpec:
    return RunSpec.from_dict(vae_record(vae_dir), required=("model",))


def vae_record(vae_dir: Path) -> dict:
    return {**RECORD, "data": {**RECORD["data"], "image_size": 16, "autoencoder": "sd-vae-ft-ema",
                            "autoencoder_path": str(vae_dir)}}


def weights(seed: int = 0, in_channels: int = 1, input_size: int = 8, conditioning: str = "adaLN-Zero",
            learn_sigma: bool = True, num_classes: int = 10) -> dict:
    return nudged_tiny_dit(seed, conditioning, in_channels, input_size, num_classes, learn_sigma).state_dict()


def tiny_model(seed: int = 0, in_channels: int = 1, input_size: int = 8, learn_sigma: bool = True,
               conditioning: str = "adaLN-Zero") -> torch.nn.Module:
    """A fresh model (train mode, as build_model returns it) with weights(seed, ...)."""
    model = build_model(MODEL, conditioning, input_size=input_size, in_channels=in_channels, num_classes=10,
                        learn_sigma=learn_sigma)
    model.load_state_dict(weights(seed, in_channels, input_size, conditioning, learn_sigma))
    return model


def ref_seed(seed: int, index: int) -> int:
    """The documented per-sample seed: the first 8 bytes of sha256("sample:{seed}:{index}"),
    little-endian, shifted right once (so it is a non-negative int64)."""
    return int.from_bytes(hashlib.sha256(f"sample:{seed}:{index}".encode()).digest()[:8], "little") >> 1


def rebuild(model, ae, labels, *, steps: int, sampler: str, cfg_scale: float = 1.0, channels: int | None = 3,
            seed: int = 0, batch_size: int = 64, first_index: int = 0) -> np.ndarray:
    """sample_images, written out from its primitives (the model in eval mode)."""
    model.eval()
    c, s, k = model.in_channels, model.input_size, model.num_classes
    learn_sigma = model.out_channels == 2 * c
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    guided = cfg_scale != 1.0

    def net(x, t, y):
        return model(x, t, y)

    fn = guided_model_fn(net, float(cfg_scale), channels) if guided else net
    out = []
    with torch.inference_mode():
        for start in range(0, len(labels), batch_size):
            y = labels[start:start + batch_size]
            g = first_index + start
            noise = torch.stack([torch.randn((c, s, s), generator=torch.Generator().manual_seed(ref_seed(seed, g + j)))
                                 for j in range(len(y))])
            gen = torch.Generator().manual_seed(ref_seed(seed, -1 - g))
            x, yy = noise, y
            if guided:
                x, yy = torch.cat([noise, noise]), torch.cat([y, torch.full_like(y, k)])
            z = sample_loop(sampler, fn, x, steps, {"y": yy}, learn_sigma, gen)[: len(y)]
            images = ae.decode(z)
            if images.shape[1] == 1:
                images = images.repeat(1, 3, 1, 1)
            out.append(to_uint8(images))
    return np.concatenate(out)


class RecordingAE:
    """Wraps a real autoencoder and records the devices it is moved to."""

    def __init__(self, ae):
        self.ae, self.downsample, self.devices = ae, ae.downsample, []

    def to(self, device):
        self.devices.append(device)
        self.ae.to(device)
        return self

    def decode(self, z):
        return self.ae.decode(z)


# ----------------------------------------------------------------------------- label and seed helpers
def test_sample_seed_known_values_and_range():
    # literal values: the seeds (hence every sample ever drawn) must not change between versions
    assert _sample_seed(0, 0) == 7797893201802763200
    assert _sample_seed(0, -1) == 293501039912147177
    assert _sample_seed(7, 3) == 1730741932039622933
    for seed in (0, 1, 123456789):
        for index in (-70, -1, 0, 1, 64, 10**6):
            v = _sample_seed(seed, index)
            assert v == ref_seed(seed, index) and 0 <= v < 2**63


def test_balanced_labels_exact_sequence():
    y = balanced_labels(13, 5)
    assert y.dtype == torch.long and y.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2]
    assert balanced_labels(0, 3).shape == (0,)


def test_random_labels_are_seeded_reproducible_and_span_every_class():
    y = random_labels(300, 10, 5)
    assert y.dtype == torch.long and y.shape == (300,)
    assert y.tolist() == torch.randint(0, 10, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    assert torch.equal(random_labels(300, 10, 5), y)  # the global RNG plays no part
    assert not torch.equal(random_labels(300, 10, 6), y)
    assert int(y.min()) == 0 and int(y.max()) == 9  # the whole range 0..K-1, nothing outside


# ----------------------------------------------------------------------------- run fields and autoencoders
def test_autoencoder_for_defaults_to_identity_and_caches_per_key():
    a = autoencoder_for(RunSpec.from_dict({"model": MODEL, "data": {}}, required=("model",)))  # identity
    assert isinstance(a, IdentityAutoencoder)
    assert autoencoder_for(RUN) is a  # the same key ("identity", None): loaded once
    assert autoencoder_for(RunSpec.from_dict({"model": MODEL}, required=("model",))) is a  # no data at all
    assert autoencoder_for(None) is a
    assert len(harness.sampling.sample._AUTOENCODERS) == 1


def test_autoencoder_for_loads_the_named_vae_from_the_expanded_path(vae_dir, monkeypatch):
    monkeypatch.setenv("SAMPLE_TEST_VAE_HOME", str(vae_dir.parent))
    run = RunSpec.from_dict({"model": MODEL, "data": {"autoencoder": "sd-vae-ft-ema", "autoencoder_path":
                                                      f"${{SAMPLE_TEST_VAE_HOME}}/{vae_dir.name}"}}, required=("model",))
    ae = autoencoder_for(run)
    assert isinstance(ae, VAEAutoencoder) and ae.name == "sd-vae-ft-ema" and ae.downsample == 8
    assert ae.fingerprint == tiny_vae_ae().fingerprint  # the weights in that folder
    assert autoencoder_for(run) is ae
    assert autoencoder_for(vae_run(vae_dir)) is ae  # the key is the expanded path
    ident = autoencoder_for(RUN)
    assert isinstance(ident, IdentityAutoencoder) and ident is not ae
    monkeypatch.delenv("SAMPLE_TEST_UNSET_VAR", raising=False)
    with pytest.raises(HarnessError) as err:
        autoencoder_for(RunSpec.from_dict({"model": MODEL, "data": {"autoencoder": "sd-vae-ft-ema", "autoencoder_path":
                                           "${SAMPLE_TEST_UNSET_VAR}/v"}}, required=("model",)))
    assert str(err.value).startswith("data.autoencoder_path: '${SAMPLE_TEST_UNSET_VAR}/v' uses the unset "
                                     "environment variable SAMPLE_TEST_UNSET_VAR.")


def test_channels_arg():
    assert _channels_arg(None) is None and _channels_arg("all") is None
    assert _channels_arg(3) == 3 and _channels_arg("3") == 3 and _channels_arg(1) == 1
    for bad in ("x", [3]):
        with pytest.raises(HarnessError) as err:
            _channels_arg(bad)
        assert str(err.value) == (f"guidance_channels={bad!r} (key eval.guidance_channels or --guidance-channels): "
                                  "use 3 (the paper's choice) or 'all'.")


# ----------------------------------------------------------------------------- sample_images, known answers
CASES = {
    # name: (in_channels, learn_sigma, sampler, steps, cfg, guidance_channels (as passed), channels (rebuild),
    #        batch_size, first_index, labels, seed)
    "ddpm-grey-batches": (1, True, "ddpm", 3, 1.0, 3, 3, 2, 0, [3, 1, 4, 1, 5], 11),
    "ddpm-guided-offset": (1, True, "ddpm", 3, 2.5, 3, 3, 3, 5, [0, 9, 2, 2, 7], 4),
    "ddim-guided-one-batch": (1, True, "ddim", 2, 4.0, "all", None, 64, 0, [6, 6, 1], 0),
    "ddpm-fixed-sigma": (1, False, "ddpm", 3, 2.0, 3, 3, 2, 0, [8, 0, 8], 2),
    "euler-rgb": (3, True, "euler", 2, 1.0, 3, 3, 2, 1, [5, 4, 3], 9),
    "vae-ddpm-guide-3": (4, True, "ddpm", 3, 3.0, "3", 3, 2, 1, [1, 2, 3], 5),
    "vae-ddpm-guide-all": (4, True, "ddpm", 3, 3.0, "all", None, 2, 1, [1, 2, 3], 5),
    "vae-ddpm-guide-default": (4, True, "ddpm", 3, 3.0, DEFAULT, 3, 2, 1, [1, 2, 3], 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sample_images_is_its_primitives_composed(case, vae_dir):
    c, learn_sigma, sampler, steps, cfg, gc, channels, bs, first, labels, seed = CASES[case]
    vae = c == 4
    model = tiny_model(in_channels=c, input_size=2 if vae else 8, learn_sigma=learn_sigma)
    run = vae_run(vae_dir) if vae else RUN
    kw = {} if gc is DEFAULT else {"guidance_channels": gc}
    # the VAE comes from the run (autoencoder_for); identity runs pass the autoencoder explicitly
    ae_arg = None if vae else IdentityAutoencoder()
    got = sample_images(model, run, torch.tensor(labels), sampling_steps=steps, sampler=sampler, cfg_scale=cfg,
                        seed=seed, batch_size=bs, first_index=first, autoencoder=ae_arg, **kw)
    want = rebuild(model, tiny_vae_ae() if vae else IdentityAutoencoder(), labels, steps=steps, sampler=sampler,
                   cfg_scale=cfg, channels=channels, seed=seed, batch_size=bs, first_index=first)
    side = 16 if vae else 8
    assert got.dtype == np.uint8 and got.shape == (len(labels), side, side, 3)
    np.testing.assert_array_equal(got, want)
    assert len({im.tobytes() for im in got}) == len(got)  # each sample has its own noise
    if c == 1:
        assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 0], got[..., 2])


def test_guidance_channels_matter_on_four_channel_latents(vae_dir):
    """Guarding the test above: on 4 latent channels, guiding the first 3 and all 4 differ."""
    model = tiny_model(in_channels=4, input_size=2)
    kw = dict(sampling_steps=3, sampler="ddpm", cfg_scale=3.0, seed=5, batch_size=2)
    three = sample_images(model, vae_run(vae_dir), [1, 2, 3], guidance_channels=3, **kw)
    every = sample_images(model, vae_run(vae_dir), [1, 2, 3], guidance_channels="all", **kw)
    assert not np.array_equal(three, every)


def test_defaults_are_250_ddpm_steps_seed_0_no_guidance_no_progress_bar(capsys, monkeypatch):
    model = tiny_model()
    calls = []

    def spy(sampler, fn, noise, steps, kwargs, learn_sigma, gen, progress):
        calls.append((sampler, steps, noise.shape[0], progress))
        return sample_loop(sampler, fn, noise, steps, kwargs, learn_sigma, gen, progress)
    monkeypatch.setattr(harness.sampling.sample, "sample_loop", spy)
    got = sample_images(model, RUN, [7])
    # the images alone cannot tell 250 steps from 251 (this tiny model saturates): the call says it
    assert calls == [("ddpm", 250, 1, False)]   # one unguided sample: no null-class half
    np.testing.assert_array_equal(got, rebuild(model, IdentityAutoencoder(), [7], steps=250, sampler="ddpm"))
    assert "sampling" not in capsys.readouterr().err  # no progress bar unless asked


def test_default_batch_size_is_64():
    """DDPM's step noise comes from a generator per batch, so sample 64 shows where the batch ends."""
    model = tiny_model()
    labels = balanced_labels(65, 10)
    got = sample_images(model, RUN, labels, sampling_steps=3, seed=3)
    want = rebuild(model, IdentityAutoencoder(), labels, steps=3, sampler="ddpm", seed=3, batch_size=64)
    np.testing.assert_array_equal(got, want)
    one_batch = rebuild(model, IdentityAutoencoder(), labels, steps=3, sampler="ddpm", seed=3, batch_size=65)
    assert not np.array_equal(got[64], one_batch[64])


def test_a_slice_with_first_index_gives_the_whole_sets_images():
    model = tiny_model()
    labels = torch.tensor([4, 8, 1, 5, 9, 2])
    kw = dict(sampling_steps=3, seed=21, cfg_scale=1.5)  # 3 DDPM steps: the step noise shows (2 saturate)
    whole = sample_images(model, RUN, labels, sampler="ddpm", batch_size=2, **kw)
    for first in (2, 4):  # DDPM: batches aligned with the whole set's
        part = sample_images(model, RUN, labels[first:], sampler="ddpm", batch_size=2, first_index=first, **kw)
        np.testing.assert_array_equal(part, whole[first:])
    whole = sample_images(model, RUN, labels, sampler="ddim", batch_size=4, **kw)
    part = sample_images(model, RUN, labels[1:5], sampler="ddim", batch_size=3, first_index=1, **kw)
    np.testing.assert_array_equal(part, whole[1:5])  # DDIM: any batching
    assert not np.array_equal(part, whole[:4])


def test_label_dtypes_are_accepted_as_long():
    model = tiny_model()
    kw = dict(sampling_steps=2, sampler="ddim", seed=1, cfg_scale=2.0)
    want = sample_images(model, RUN, torch.tensor([3, 7]), **kw)
    for labels in ([3, 7], np.array([3, 7], dtype=np.uint8), torch.tensor([3, 7], dtype=torch.int32)):
        np.testing.assert_array_equal(sample_images(model, RUN, labels, **kw), want)


def test_device_argument_and_default_device():
    model = tiny_model()
    kw = dict(sampling_steps=2, sampler="ddim", seed=1)
    default = RecordingAE(IdentityAutoencoder())
    a = sample_images(model, None, [1, 2], autoencoder=default, **kw)
    assert default.devices == [torch.device("cpu")]  # the model's device
    explicit = RecordingAE(IdentityAutoencoder())
    b = sample_images(model, None, [1, 2], autoencoder=explicit, device="cpu:0", **kw)
    assert explicit.devices == [torch.device("cpu", 0)]  # the device asked for, as a torch.device
    np.testing.assert_array_equal(a, b)


def test_model_mode_is_eval_while_sampling_and_restored_even_on_error():
    model = tiny_model()
    assert model.training
    modes = []
    model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    kw = dict(sampling_steps=2, sampler="ddim", autoencoder=IdentityAutoencoder())
    sample_images(model, None, [1, 2], **kw)
    assert modes and not any(modes) and model.training
    model.eval()
    sample_images(model, None, [1, 2], **kw)
    assert not model.training

    class FailingDecode(IdentityAutoencoder):
        def decode(self, z):
            raise RuntimeError("decode failed")

    model.train()
    with pytest.raises(RuntimeError, match="decode failed"):
        sample_images(model, None, [1, 2], sampling_steps=2, sampler="ddim", autoencoder=FailingDecode())
    assert model.training


def test_sample_images_errors_name_the_key_and_the_fix():
    model = tiny_model()
    with pytest.raises(HarnessError) as err:
        sample_images(model, RUN, [1], sampler="nope")
    assert str(err.value) == (f"sampler 'nope' (key eval.sampler or --sampler): use one of {', '.join(SAMPLERS)}.")
    assert "use one of ddpm, ddim, " in str(err.value)
    for labels in ([-1, 0], [10], [0, 10], [3, -2]):
        with pytest.raises(HarnessError) as err:
            sample_images(model, RUN, labels, sampling_steps=2)
        assert str(err.value) == "labels must lie in 0..9 for this model."
    assert sample_images(model, RUN, [0, 9], sampling_steps=2).shape == (2, 8, 8, 3)  # both ends are fine
    with pytest.raises(HarnessError) as err:
        sample_images(model, RUN, [1], sampling_steps=2, cfg_scale=2.0, guidance_channels="x")
    assert str(err.value).startswith("guidance_channels='x' (key eval.guidance_channels or --guidance-channels)")


def test_empty_labels_give_an_empty_uint8_array_of_the_image_shape(vae_dir):
    for labels in ([], torch.empty(0, dtype=torch.long)):
        out = sample_images(tiny_model(), RUN, labels, sampling_steps=2)
        assert out.shape == (0, 8, 8, 3) and out.dtype == np.uint8
    out = sample_images(tiny_model(in_channels=4, input_size=2), vae_run(vae_dir), [], sampling_steps=2)
    assert out.shape == (0, 16, 16, 3) and out.dtype == np.uint8  # latent side x the VAE's downsampling


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_on_cuda_sampling_and_loading_use_the_gpu(tmp_path):
    """The model's device is the default; inputs follow it. CPU vs GPU: within 2 uint8 levels
    (TF32 convolutions and a different summation order; 2 DDIM steps do not amplify that)."""
    model = tiny_model()
    kw = dict(sampling_steps=2, sampler="ddim", seed=1, cfg_scale=2.0)
    cpu = sample_images(model, RUN, [1, 2, 3], **kw)
    model.cuda()
    default = sample_images(model, RUN, [1, 2, 3], **kw)
    explicit = sample_images(model, RUN, [1, 2, 3], device="cuda", **kw)
    np.testing.assert_array_equal(default, explicit)
    assert np.abs(default.astype(int) - cpu.astype(int)).max() <= 2
    ckpt = save_checkpoint(tmp_path / "ckpt", 7, {"model": weights(1), "ema": weights(2), "step": 7, "run": RECORD})
    loaded, _, _ = model_from_checkpoint(ckpt, device="cuda")
    assert next(loaded.parameters()).device.type == "cuda"


# ----------------------------------------------------------------------------- grids and npz
def test_make_grid_places_each_image_exactly():
    images = np.random.default_rng(0).integers(0, 255, (5, 2, 3, 3), dtype=np.uint8)  # 2 high, 3 wide, < 255
    grid = make_grid(images, nrow=2, pad=1)
    want = np.full((10, 9, 3), 255, dtype=np.uint8)
    want[1:3, 1:4], want[1:3, 5:8] = images[0], images[1]
    want[4:6, 1:4], want[4:6, 5:8] = images[2], images[3]
    want[7:9, 1:4] = images[4]
    assert grid.dtype == np.uint8
    np.testing.assert_array_equal(grid, want)


def test_make_grid_default_rows_and_padding():
    for n, nrow in [(1, 1), (2, 2), (3, 2), (4, 2), (5, 3), (9, 3), (10, 4)]:
        grid = make_grid(np.zeros((n, 1, 1, 3), dtype=np.uint8), pad=0)
        assert grid.shape == (-(-n // nrow), nrow, 3), n
    grid = make_grid(np.zeros((1, 4, 4, 3), dtype=np.uint8))  # pad 2 on every side, white
    assert grid.shape == (8, 8, 3) and grid[:2].min() == 255 and grid[2:6, 2:6].max() == 0


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


def test_save_grid_enlarges_small_images_by_64_over_height(tmp_path):
    rng = np.random.default_rng(1)
    for (h, w), scale in [((5, 8), 12), ((8, 8), 8), ((32, 32), 2), ((64, 64), 1), ((100, 100), 1)]:
        images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        path = save_grid(images, tmp_path / f"g{h}x{w}.png")
        assert path == tmp_path / f"g{h}x{w}.png"
        big = images.repeat(scale, axis=1).repeat(scale, axis=2)
        np.testing.assert_array_equal(_png(path), make_grid(big, 2))


def test_save_grid_explicit_scale_and_rows(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    got = _png(save_grid(images, tmp_path / "g.png", nrow=1, scale=3))
    assert got.shape == (3 * 14 + 2, 16, 3)
    np.testing.assert_array_equal(got, make_grid(images.repeat(3, axis=1).repeat(3, axis=2), 1))
    one = _png(save_grid(images[:1], tmp_path / "one.png"))  # a single image is fine
    assert one.shape == (64 + 4, 64 + 4, 3)


def test_save_grid_rejects_what_is_not_a_non_empty_uint8_batch(tmp_path):
    bad = [np.zeros((8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.float32), np.zeros((0, 8, 8, 3), np.uint8)]
    for images in bad:
        with pytest.raises(ValueError) as err:
            save_grid(images, tmp_path / "g.png")
        assert str(err.value) == (f"save_grid wants a non-empty uint8 (N, H, W, C) array, got {images.dtype} "
                                  f"{images.shape}")
    assert not (tmp_path / "g.png").exists()


def test_save_npz_writes_int64_labels_and_rejects_bad_input(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    for i, labels in enumerate([np.array([1, 2, 9], np.int32), torch.tensor([1, 2, 9], dtype=torch.int32)]):
        path = save_npz(images, labels, tmp_path / f"s{i}.npz")
        assert path == tmp_path / f"s{i}.npz"
        with np.load(path) as f:
            assert sorted(f.files) == ["arr_0", "arr_1"]
            assert f["arr_1"].dtype == np.int64 and f["arr_1"].tolist() == [1, 2, 9]
            np.testing.assert_array_equal(f["arr_0"], images)
    bad = [(images[..., :1], [0, 1, 2]), (images.astype(np.float32), [0, 1, 2]), (images, [0, 1]),
           (images[0], [0, 1, 2, 3])]
    for imgs, labels in bad:
        with pytest.raises(ValueError) as err:
            save_npz(imgs, labels, tmp_path / "bad.npz")
        assert str(err.value) == (f"ADM npz wants uint8 (N, H, W, 3) and N labels, got {imgs.dtype} {imgs.shape}, "
                                  f"({len(labels)},) labels")
    assert not (tmp_path / "bad.npz").exists()


# ----------------------------------------------------------------------------- model_from_checkpoint
def _save(tmp_path: Path, run=RECORD, step: int = 7, **state) -> Path:
    state = {"model": weights(1), "ema": weights(2), "opt": {}, "step": step, "run": run, **state}
    return save_checkpoint(tmp_path / "ckpt", step, {k: v for k, v in state.items() if v is not DEFAULT})


def _same_weights(model: torch.nn.Module, want: dict) -> bool:
    got = model.state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_load_model_uses_the_ema_weights_by_default_and_raw_on_request(tmp_path):
    path = _save(tmp_path)
    model, run, ckpt = model_from_checkpoint(path)  # defaults: EMA, CPU
    assert _same_weights(model, weights(2)) and not _same_weights(model, weights(1))
    assert not model.training and next(model.parameters()).device == torch.device("cpu")
    assert run == RUN and ckpt["step"] == 7 and _same_weights(model, ckpt["ema"])
    raw, _, _ = model_from_checkpoint(path, use_ema=False, device="cpu")
    assert _same_weights(raw, weights(1)) and not raw.training
    # the model samples exactly as one built independently and loaded with those weights
    kw = dict(sampling_steps=2, sampler="ddim", seed=1)
    np.testing.assert_array_equal(sample_images(model, run, [1, 2], **kw),
                                  sample_images(tiny_model(2).eval(), RUN, [1, 2], **kw))


def test_load_model_strips_ddp_and_compile_prefixes(tmp_path):
    ema, raw = weights(2), weights(1)
    path = _save(tmp_path, ema={f"module._orig_mod.{k}": v for k, v in ema.items()},
                 model={f"_orig_mod.{k}": v for k, v in raw.items()})
    assert _same_weights(model_from_checkpoint(path)[0], ema)
    assert _same_weights(model_from_checkpoint(path, use_ema=False)[0], raw)
    path = _save(tmp_path / "b", ema={f"module.{k}": v for k, v in ema.items()})
    assert _same_weights(model_from_checkpoint(path)[0], ema)


def test_load_model_errors_say_what_is_wrong_and_what_to_do(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(HarnessError) as err:
        model_from_checkpoint(missing)
    assert str(err.value) == (f"{missing}: no such checkpoint (--checkpoint); checkpoints live in "
                              "results/<sweep>/runs/<run_id>/checkpoints/step_XXXXXXX.pt.")
    for i, run in enumerate([DEFAULT, "run.json", {"data": RECORD["data"]}]):  # none, not a dict, no model
        path = _save(tmp_path / f"r{i}", run=run)
        with pytest.raises(HarnessError) as err:
            model_from_checkpoint(path)
        assert str(err.value) == (f"{path}: the checkpoint has no 'run' dict (run.json), so the model cannot "
                                  "be rebuilt.")
    for i, ema in enumerate([DEFAULT, None]):
        path = _save(tmp_path / f"e{i}", ema=ema)
        with pytest.raises(HarnessError) as err:
            model_from_checkpoint(path)
        assert str(err.value) == (f"{path}: the checkpoint has no EMA weights; pass --no-ema to use the raw "
                                  "weights.")
        assert _same_weights(model_from_checkpoint(path, use_ema=False)[0], weights(1))
    path = _save(tmp_path / "corrupt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(HarnessError) as err:
        model_from_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ")
    assert str(err.value).endswith(" (--checkpoint); pick another checkpoint of the run.")


def test_load_model_rebuilds_the_architecture_the_run_names(tmp_path, vae_dir):
    # conditioning and class dropout from the run; defaults adaLN-Zero and 0.1 when absent
    run = {**RECORD, "conditioning": "adaLN", "train": {"class_dropout": 0.25}}
    w = weights(3, conditioning="adaLN")
    model = model_from_checkpoint(_save(tmp_path / "a", run=run, ema=w))[0]
    assert model.conditioning == "adaLN" and model.y_embedder.dropout == 0.25 and _same_weights(model, w)
    bare = {"model": MODEL, "data": {"image_size": 8, "num_classes": 10}}  # no conditioning/train/dataset/ae
    model = model_from_checkpoint(_save(tmp_path / "b", run=bare))[0]
    assert model.conditioning == "adaLN-Zero" and model.y_embedder.dropout == 0.1
    assert (model.in_channels, model.input_size, model.num_classes) == (1, 8, 10)  # digits: grey
    run = {**RECORD, "data": {**RECORD["data"], "dataset": str(tmp_path / "imagefolder"), "num_classes": 7}}
    w = weights(4, in_channels=3, num_classes=7)
    model = model_from_checkpoint(_save(tmp_path / "c", run=run, ema=w))[0]
    assert (model.in_channels, model.input_size, model.num_classes) == (3, 8, 7) and _same_weights(model, w)
    w = weights(5, in_channels=4, input_size=2)
    model = model_from_checkpoint(_save(tmp_path / "d", run=vae_record(vae_dir), ema=w))[0]
    assert (model.in_channels, model.input_size) == (4, 2) and _same_weights(model, w)  # 16 px / 8, 4 latents


# ----------------------------------------------------------------------------- harness sample
@pytest.fixture
def cpu_only(monkeypatch):
    """`harness sample` picks CUDA when there is one: pin the CPU so outputs are exact everywhere."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cli_sample_ema_balanced_grid_of_the_first_256_and_summary(tmp_path, capsys, cpu_only):
    ckpt = _save(tmp_path)
    out = tmp_path / "out"
    assert main(["sample", "--checkpoint", str(ckpt), "--num-samples", "257", "--steps", "2", "--sampler", "ddim",
                 "--out", str(out)]) == 0
    labels = torch.arange(257) % 10
    with np.load(out / "samples.npz") as f:
        images, got_labels = f["arr_0"], f["arr_1"]
    assert got_labels.dtype == np.int64 and got_labels.tolist() == labels.tolist()
    np.testing.assert_array_equal(images, rebuild(tiny_model(2), IdentityAutoencoder(), labels, steps=2,
                                                  sampler="ddim", batch_size=64))
    np.testing.assert_array_equal(_png(out / "grid.png"), make_grid(images[:256].repeat(8, 1).repeat(8, 2)))
    io = capsys.readouterr()
    assert io.out == (f"{out / 'samples.npz'}: 257 samples 8x8 (step 7, EMA weights, ddim 2 steps, cfg 1)\n"
                      f"{out / 'grid.png'}: grid of the first 256\n")
    assert "sampling" in io.err  # the progress bar


def test_cli_sample_raw_weights_random_labels_guided_in_batches(tmp_path, capsys, cpu_only):
    ckpt = _save(tmp_path, step=12)
    out = tmp_path / "raw"
    assert main(["sample", "--checkpoint", str(ckpt), "--num-samples", "5", "--steps", "3", "--no-ema",
                 "--labels", "random", "--seed", "4", "--cfg-scale", "1.5", "--batch-size", "2",
                 "--out", str(out)]) == 0
    labels = torch.randint(0, 10, (5,), generator=torch.Generator().manual_seed(4))
    with np.load(out / "samples.npz") as f:
        assert f["arr_1"].tolist() == labels.tolist()
        np.testing.assert_array_equal(f["arr_0"], rebuild(tiny_model(1), IdentityAutoencoder(), labels, steps=3,
                                                          sampler="ddpm", cfg_scale=1.5, seed=4, batch_size=2))
    assert capsys.readouterr().out == (f"{out / 'samples.npz'}: 5 samples 8x8 (step 12, raw weights, ddpm 3 steps, "
                                       f"cfg 1.5)\n{out / 'grid.png'}: grid of the first 5\n")


def test_cli_sample_decodes_with_the_runs_vae_and_guides_the_channels_asked(tmp_path, vae_dir, cpu_only):
    w = weights(6, in_channels=4, input_size=2)
    ckpt = _save(tmp_path, run=vae_record(vae_dir), ema=w)
    model = tiny_model(6, in_channels=4, input_size=2)
    labels = torch.arange(3)
    got = {}
    for gc, channels in [("3", 3), ("all", None)]:
        out = tmp_path / gc
        assert main(["sample", "--checkpoint", str(ckpt), "--num-samples", "3", "--steps", "3", "--cfg-scale", "2",
                     "--guidance-channels", gc, "--batch-size", "2", "--seed", "8", "--out", str(out)]) == 0
        with np.load(out / "samples.npz") as f:
            got[gc] = f["arr_0"]
        want = rebuild(model, tiny_vae_ae(), labels, steps=3, sampler="ddpm", cfg_scale=2.0, channels=channels,
                       seed=8, batch_size=2)
        assert got[gc].shape == (3, 16, 16, 3)
        np.testing.assert_array_equal(got[gc], want)
    assert not np.array_equal(got["3"], got["all"])


def test_cli_sample_needs_at_least_one_sample(tmp_path, cpu_only):
    ckpt = _save(tmp_path)
    args = build_parser().parse_args(["sample", "--checkpoint", str(ckpt), "--steps", "2", "--sampler", "ddim",
                                      "--out", str(tmp_path / "out")])
    args.num_samples = 0  # argparse refuses it; cli_sample checks again
    with pytest.raises(HarnessError) as err:
        cli_sample(args)
    assert str(err.value) == "--num-samples must be at least 1, got 0."
    assert not (tmp_path / "out").exists()
    args.num_samples = 1
    assert cli_sample(args) == 0
    with np.load(tmp_path / "out" / "samples.npz") as f:
        assert f["arr_0"].shape == (1, 8, 8, 3) and f["arr_1"].tolist() == [0]
