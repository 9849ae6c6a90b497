"""`eval.batch_size: auto` (issue 23): the sampling batch probe picks the largest candidate whose forward
-- doubled under guidance -- fits the memory budget, measured rather than assumed; caches the answer; and
the streaming ADM npz writer gives the bytes np.savez-layout readers expect, or no file at all."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.errors import HarnessError
from harness.sampling import batch as probe
from harness.sampling.npz import NpzWriter, save_npz
from train_tiny import nudged_tiny_dit


def _model() -> torch.nn.Module:
    return nudged_tiny_dit().eval()


def test_candidates_are_powers_of_two_and_the_set_size_largest_first():
    assert probe.candidates(5000) == [1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert probe.candidates(100) == [100, 64, 32, 16, 8, 4, 2, 1]
    assert probe.candidates(64) == [64, 32, 16, 8, 4, 2, 1]
    assert probe.candidates(1) == [1]


def test_live_bytes_counts_what_is_alive_at_once_views_included():
    mb = 2**20
    with probe.LiveBytes() as counter:
        a = torch.empty(mb, dtype=torch.uint8).fill_(1)      # 1 MB (empty is counted, fill_ is in place)
        v = a.view(-1)[:10]                                  # a view: no new storage
        del a                                                # the view keeps the storage alive
        b = torch.ones(2 * mb, dtype=torch.uint8)            # +2 MB: 3 MB alive
        del v                                                # 1 MB released
        c = torch.ones(mb, dtype=torch.uint8)                # 3 MB again, never 4
        del b, c
    assert counter.peak == 3 * mb and counter.live == 0


def test_the_cpu_probe_picks_the_largest_batch_whose_measured_peak_fits(monkeypatch):
    model = _model()
    forward = probe.forward_probe(model, "fp32", torch.device("cpu"))
    per_image = probe.cpu_bytes(forward, 2) - probe.cpu_bytes(forward, 1)
    assert per_image > 0
    budget = probe.cpu_bytes(forward, 1) + 40 * per_image      # room for ~40 images, not 64
    monkeypatch.setenv(probe.BUDGET_ENV, str(budget / 2**20))
    unguided = probe.find_sample_batch(model, 5000, False, "fp32", torch.device("cpu"))
    guided = probe.find_sample_batch(model, 5000, True, "fp32", torch.device("cpu"))
    assert (unguided, guided) == (32, 16)                     # guidance doubles the forward: half the images
    # the answer is measured, not only extrapolated: at it the forward fits, at the next candidate it does not
    assert probe.cpu_bytes(forward, unguided) <= budget < probe.cpu_bytes(forward, 2 * unguided)


def test_the_answer_is_cached_per_setting_and_nothing_fitting_is_one_clear_error(monkeypatch, tmp_path):
    model = _model()
    monkeypatch.setenv(probe.BUDGET_ENV, "4096")
    first = probe.auto_sample_batch(model, 300, False, "fp32", torch.device("cpu"))
    assert first == 300                                        # the whole set fits in one batch

    def refuse(*args, **kwargs):
        raise AssertionError("probed again although the answer is cached")

    monkeypatch.setattr(probe, "find_sample_batch", refuse)
    assert probe.auto_sample_batch(model, 300, False, "fp32", torch.device("cpu")) == first
    with pytest.raises(AssertionError, match="probed again"):   # another setting is another key
        probe.auto_sample_batch(model, 300, True, "fp32", torch.device("cpu"))
    monkeypatch.undo()
    monkeypatch.setenv(probe.BUDGET_ENV, "0.0001")
    with pytest.raises(HarnessError, match=r"eval.batch_size: auto found no sampling batch .* smallest tried was 1"):
        probe.find_sample_batch(model, 300, False, "fp32", torch.device("cpu"))


def test_streamed_npz_equals_the_one_written_at_once_and_a_short_or_failed_write_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), np.arange(10) % 3
    whole = save_npz(images, labels, tmp_path / "whole.npz")
    with NpzWriter(tmp_path / "streamed.npz", 10, 8, 8) as w:
        for lo in range(0, 10, 4):
            w.add(images[lo:lo + 4], labels[lo:lo + 4])
    assert (tmp_path / "streamed.npz").read_bytes() == whole.read_bytes()
    with np.load(whole) as f:
        assert np.array_equal(f["arr_0"], images) and f["arr_1"].dtype == np.int64
        assert np.array_equal(f["arr_1"], labels)
    with pytest.raises(ValueError, match="4 images written, 10 declared"):
        with NpzWriter(tmp_path / "short.npz", 10, 8, 8) as w:
            w.add(images[:4], labels[:4])
            w.close()
    with pytest.raises(RuntimeError):
        with NpzWriter(tmp_path / "failed.npz", 10, 8, 8) as w:
            w.add(images[:4], labels[:4])
            raise RuntimeError("the sampler died")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.npz", "whole.npz"]
