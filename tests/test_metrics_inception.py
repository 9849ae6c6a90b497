"""The Inception path end to end, with a randomly initialised weights file written by the test."""
import numpy as np
import pytest
import torch

from harness.config.vocab import FID_FEATURES
from harness.errors import HarnessError
from harness.metrics import compute_metrics, load_reference
from harness.metrics.inception import (NUM_LOGITS, POOL_DIM, SPATIAL_DIM, WEIGHTS_ENV, WEIGHTS_URL,
                                       InceptionFeatures, hub_weights_path, resolve_weights,
                                       write_random_inception_weights)
from tolerance import FP32_U, fp32_bound, rel_err


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth", seed=0)


def test_missing_weights_error_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(HarnessError) as err:
        resolve_weights(None)
    msg = str(err.value)
    assert str(hub_weights_path()) in msg and WEIGHTS_URL in msg and "--inception-weights" in msg
    with pytest.raises(HarnessError, match="does not exist"):
        resolve_weights(tmp_path / "nope.pth")


def test_weights_resolve_from_env_and_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    hub = hub_weights_path()
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert resolve_weights(None) == hub
    other = tmp_path / "mine.pth"
    other.write_bytes(b"y")
    monkeypatch.setenv(WEIGHTS_ENV, str(other))
    assert resolve_weights(None) == other


def test_unloadable_weights_file_is_a_harness_error(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(HarnessError, match="could not be loaded"):
        InceptionFeatures(bad, device="cpu")


@pytest.mark.slow  # Inception-V3 at 299x299 on a shared CPU, and two 2048-d matrix square roots
def test_inception_features_and_metrics_end_to_end(weights, tmp_path):
    ex = InceptionFeatures(weights, device="cpu")
    assert ex.name.startswith("inception-custom-")  # never mistaken for real FID numbers
    rng = np.random.RandomState(0)
    real = rng.randint(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    fake = np.clip(real.astype(int) + rng.randint(-40, 41, real.shape), 0, 255).astype(np.uint8)

    seen = {}
    hook = ex.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("o", o.clone()))
    feats = ex.extract(real[:3], batch_size=3)
    hook.remove()
    assert feats.pool.shape == (3, POOL_DIM) == (3, 2048) == (3, FID_FEATURES["inception"][0])  # what the plan sizes
    assert feats.spatial.shape == (3, SPATIAL_DIM) == (3, 2023)
    assert feats.logits.shape == (3, NUM_LOGITS)
    # spatial = mixed_6/conv, first 7 channels, flattened in TF's (H, W, C) order
    expect = seen["o"][:, :7].permute(0, 2, 3, 1).reshape(3, -1).numpy()
    np.testing.assert_allclose(feats.spatial, expect, rtol=1e-6)
    # logits are pool x softmax weights, without the bias (ADM's Inception Score graph)
    # two float32 dot products of 2048 terms in another order: each within 2047 roundings of sum |p_k w_jk|
    W = ex.net.fc.weight.detach().numpy()
    assert (np.abs(feats.logits - feats.pool @ W.T) <= 2 * 2048 * FP32_U * (np.abs(feats.pool) @ np.abs(W).T)).all()
    # sensible scale: activations neither vanish nor explode
    assert 1e-2 < feats.pool.std() < 1e3 and 1e-3 < feats.spatial.std() < 1e3
    # batching does not change features
    # (another batch may take other conv kernels: the forward's roundings, at most the sum of every conv's
    # dot-product length, relative to the pool's scale)
    again = ex.extract(real[:3], batch_size=2)
    convs = [m for m in ex.net.modules() if isinstance(m, torch.nn.Conv2d)]
    roundings = sum(m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] for m in convs)
    assert rel_err(again.pool, feats.pool) <= fp32_bound(roundings)

    ref_npz = tmp_path / "ref.npz"
    np.savez(ref_npz, real)
    ref = load_reference(str(ref_npz), ex, batch_size=3)
    assert ref.mu.shape == (2048,) and ref.sigma_s.shape == (2023, 2023) and ref.resolution == 32
    self_metrics = compute_metrics(real, ref, ex, metrics=["precision", "recall"], batch_size=3)
    other = compute_metrics(fake, ref, ex, batch_size=3)
    assert self_metrics["fid"] is None
    assert self_metrics["precision"] == 1.0 and self_metrics["recall"] == 1.0
    assert other["fid"] > 0 and other["sfid"] > 0 and other["inception_score"] >= 1.0
    assert other["feature_space"] == ex.name
