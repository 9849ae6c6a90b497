"""`harness evaluate` on ADM-layout npz files, and the reference sources (npz, ADM statistics, folders)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness.data.datasets import load_digits
from harness.errors import HarnessError
from harness.metrics import get_feature_extractor, load_reference
from harness.metrics.features import FeatureExtractor
from tolerance import fp32_bound, fp64_bound


@pytest.fixture(scope="module")
def halves():
    gray, _ = load_digits()
    images = np.repeat(gray[..., None], 3, axis=-1)
    perm = np.random.RandomState(0).permutation(len(images))
    return images[perm[:900]], images[perm[900:]]


def evaluate(*args):
    return subprocess.run([sys.executable, "-m", "harness", "evaluate", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two CLI processes; the first may train the digits classifier into the cache
def test_cli_evaluate_adm_npz_files(halves, tmp_path):
    samples, reference = tmp_path / "samples.npz", tmp_path / "VIRTUAL_digits.npz"
    np.savez(samples, halves[0])
    np.savez(reference, halves[1])
    out = tmp_path / "metrics.json"
    proc = evaluate("--samples", samples, "--reference", reference, "--features", "digits", "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["feature_space"] == "digits" and result["num_samples"] == 900
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert isinstance(result[key], float)
    assert 0 <= result["fid"] < 20 and result["inception_score"] > 8 and result["precision"] > 0.8
    assert "FID" in proc.stdout and "digits" in proc.stdout

    noise = tmp_path / "noise.npz"
    np.savez(noise, np.random.RandomState(0).randint(0, 256, halves[0].shape).astype(np.uint8))
    out2 = tmp_path / "noise.json"
    proc = evaluate("--samples", noise, "--reference", "digits", "--features", "digits",
                    "--metrics", "fid,is", "--json", out2)
    assert proc.returncode == 0, proc.stderr
    bad = json.loads(out2.read_text())
    assert bad["fid"] > 50 * result["fid"] and bad["sfid"] is None and bad["recall"] is None


def test_cli_evaluate_user_errors(tmp_path, capsys):
    from harness.cli import main

    def run(*args):
        rc = main(["evaluate", *map(str, args)])
        return rc, capsys.readouterr().err

    wrong_key = tmp_path / "k.npz"
    np.savez(wrong_key, images=np.zeros((4, 8, 8, 3), np.uint8))
    rc, err = run("--samples", wrong_key, "--reference", "digits", "--features", "digits")
    assert rc == 2 and "arr_0" in err and str(wrong_key) in err
    floats = tmp_path / "f.npz"
    np.savez(floats, np.zeros((4, 8, 8, 3), np.float32))
    rc, err = run("--samples", floats, "--reference", "digits", "--features", "digits")
    assert rc == 2 and "uint8" in err
    good = tmp_path / "g.npz"
    np.savez(good, np.zeros((4, 8, 8, 3), np.uint8))
    rc, err = run("--samples", good, "--reference", "digits", "--features", "digits", "--metrics", "fid,kid")
    assert rc == 2 and "'kid'" in err and "--metrics" in err
    rc, err = run("--samples", good, "--reference", tmp_path / "missing", "--features", "digits")
    assert rc == 2 and "missing" in err and "--reference" in err
    rc, err = run("--samples", tmp_path / "absent.npz", "--reference", "digits", "--features", "digits")
    assert rc == 2 and "does not exist" in err


def test_folder_reference_matches_npz_reference(halves, tmp_path):
    from PIL import Image

    ex = get_feature_extractor("digits", device="cpu")
    images = halves[1][:200]
    for i, im in enumerate(images):
        (tmp_path / "ref" / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tmp_path / "ref" / f"class{i % 3}" / f"{i:04d}.png")
    np.savez(tmp_path / "ref.npz", images)
    folder = load_reference(str(tmp_path / "ref"), ex)
    npz = load_reference(str(tmp_path / "ref.npz"), ex)
    assert folder.num_images == npz.num_images == 200 and folder.resolution == npz.resolution == 8
    # the same 200 images in other batches (folder order): each image's float32 features may move by the
    # digits CNN's roundings (dot products of 9 + 144 + 288 + 288, a mean of 16: < 1024) of that image's
    # feature scale s_n, and the float64 sums are reordered. With M2 = tr(sigma) + |mu|^2 >= mean s_n^2:
    # |d mu| <= delta sqrt(M2); |d sigma_ij| <= 2 delta sqrt(M2) sqrt(max sigma_kk) N/(N-1) (Cauchy-Schwarz)
    delta = fp32_bound(1024)
    for mu, sigma, mu2, sigma2 in ((npz.mu, npz.sigma, folder.mu, folder.sigma),
                                   (npz.mu_s, npz.sigma_s, folder.mu_s, folder.sigma_s)):
        m2 = np.trace(sigma) + mu @ mu
        assert np.abs(mu2 - mu).max() <= delta * m2 ** 0.5 + fp64_bound(256) * m2 ** 0.5
        assert np.abs(sigma2 - sigma).max() <= (2 * delta * (m2 * np.diag(sigma).max()) ** 0.5 * 200 / 199
                                                + fp64_bound(256) * m2)
    with pytest.raises(HarnessError, match="eval.reference"):
        load_reference(str(tmp_path / "nothing-here"), ex)


class _MeanColour(FeatureExtractor):
    """A stand-in feature space named 'inception', to check how ADM's precomputed statistics load."""
    name, identity, device = "inception", "test-mean-colour", torch.device("cpu")
    calls = 0

    def _forward(self, batch):
        type(self).calls += 1
        x = batch.float().mean(dim=(1, 2))
        return x, x, x


def test_adm_reference_batch_statistics_load_directly(tmp_path):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (20, 16, 16, 3)).astype(np.uint8)
    stats = {"mu": rng.randn(3), "sigma": np.eye(3) * 2, "mu_s": rng.randn(3), "sigma_s": np.eye(3) * 3}
    path = tmp_path / "VIRTUAL_test.npz"
    np.savez(path, images, **stats)
    ex = _MeanColour()
    ref = load_reference(str(path), ex)
    for key, value in stats.items():
        np.testing.assert_array_equal(getattr(ref, key), value)
    assert ref.resolution == 16 and ref.num_images == 20 and ex.calls == 0  # no features extracted yet
    pool = ref.pool_features()  # precision/recall: extracted from arr_0 on first use, then cached
    np.testing.assert_allclose(pool, images.reshape(20, -1, 3).mean(1), rtol=1e-5)
    assert ex.calls > 0
    # another feature space must not use Inception statistics: it computes its own from arr_0
    digits = load_reference(str(path), get_feature_extractor("digits", device="cpu"))
    assert digits.mu.shape == (32,)
    # statistics without images are useless outside Inception, and say so
    only_stats = tmp_path / "stats_only.npz"
    np.savez(only_stats, **stats)
    with pytest.raises(HarnessError, match="arr_0"):
        load_reference(str(only_stats), get_feature_extractor("digits", device="cpu"))
