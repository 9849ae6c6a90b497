"""The trainer: exact resume, corrupt-checkpoint fallback, NaN stop, data order, learning, records."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from harness.errors import HarnessError
from harness.config.layout import RunFolder
from harness.io import read_jsonl
from harness.training.train import DataOrder, run_training
from train_tiny import assert_bitwise_equal, final_state, tiny_run




def test_data_order_is_a_pure_function_of_seed_epoch_position():
    a, b = DataOrder(10, seed=3), DataOrder(10, seed=3)
    idx, flip = a.take(0, 25)  # crosses two epoch boundaries
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    assert not np.array_equal(idx[:10], idx[10:20])  # a new permutation each epoch
    idx2, flip2 = b.take(13, 12)  # mid-epoch start, fresh object: same answer
    assert np.array_equal(idx2, idx[13:25]) and np.array_equal(flip2, flip[13:25])
    assert set(np.unique(flip)) == {0, 1}
    assert not np.array_equal(DataOrder(10, seed=4).take(0, 10)[0], idx[:10])


def test_stop_and_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
    run = tiny_run(steps=6)
    run_training(run, tmp_path / "a", stop_at=3)
    assert not (tmp_path / "a" / "done").exists()
    assert (tmp_path / "a" / "checkpoints" / "step_0000003.pt").exists()
    run_training(run, tmp_path / "a")
    run_training(run, tmp_path / "b")
    assert (tmp_path / "a" / "done").exists() and (tmp_path / "b" / "done").exists()
    assert_bitwise_equal(final_state(tmp_path / "a", 6), final_state(tmp_path / "b", 6))
    # the records: one train.jsonl line per step, no duplicates after the resume
    steps = [r["step"] for r in read_jsonl(tmp_path / "a" / "train.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    rec = next(read_jsonl(tmp_path / "a" / "train.jsonl"))
    for key in ("loss", "mse", "vb", "lr", "steps_per_s", "images_per_s", "peak_mem_mb", "wall_s", "time"):
        assert rec[key] is not None and rec[key] >= 0, key
    assert (tmp_path / "a" / "samples" / "grid_step_0000006.png").exists()
    # retention: last 2 only (no eval steps here)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("*.pt")) == [
        "step_0000004.pt", "step_0000006.pt"]


def test_corrupt_newest_checkpoint_resumes_from_previous(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="harness")
    run4 = tiny_run(steps=6)
    run_training(run4, tmp_path / "a", stop_at=4)
    bad = tmp_path / "a" / "checkpoints" / "step_0000004.pt"
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated, e.g. a full disk
    run_training(run4, tmp_path / "a")
    assert "step_0000004.pt" in caplog.text and "resumed" in caplog.text and "step_0000002.pt" in caplog.text
    run_training(run4, tmp_path / "b")
    assert_bitwise_equal(final_state(tmp_path / "a", 6), final_state(tmp_path / "b", 6))
    # steps 3 and 4 were trained twice (the resume went back to step 2), but each is recorded once,
    # with the loss of the undisturbed run (issue 28, finding 7)
    a, b = (list(read_jsonl(tmp_path / d / "train.jsonl")) for d in "ab")
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_nan_loss_stops_with_the_step(tmp_path):
    run = tiny_run(steps=6, lr=1e30, ckpt_every=100)  # step 1 sends the weights to ~1e30
    with pytest.raises(HarnessError, match=r"NaN or Inf at step 2\b"):
        run_training(run, tmp_path)
    assert not any((tmp_path / "checkpoints").glob("*.pt"))  # nothing saved from the diverged weights
    assert not (tmp_path / "done").exists()


def test_done_run_is_a_no_op(tmp_path):
    run = tiny_run(steps=2)
    run_training(run, tmp_path)
    mtime = (tmp_path / "checkpoints" / "step_0000002.pt").stat().st_mtime_ns
    lines = len(list(read_jsonl(tmp_path / "train.jsonl")))
    run_training(run, tmp_path)
    assert (tmp_path / "checkpoints" / "step_0000002.pt").stat().st_mtime_ns == mtime
    assert len(list(read_jsonl(tmp_path / "train.jsonl"))) == lines


@pytest.mark.slow
def test_training_on_digits_lowers_the_loss(tmp_path):
    run = tiny_run(steps=100, global_batch=32, lr=2e-3, ckpt_every=1000, log_every=5, ema_decay=0.99)
    run.model = "DiT-2x64x2/2"
    run_training(run, tmp_path)
    losses = [r["mse"] for r in read_jsonl(tmp_path / "train.jsonl")]
    first, last = losses[0], float(np.mean(losses[-3:]))
    print("mse per 5 steps:", [round(x, 3) for x in losses])
    assert first > 0.8  # adaLN-Zero starts by predicting zero noise: mse ~ 1
    assert last < 0.5 * first, (first, last)


@pytest.mark.slow
def test_evaluation_in_training_appends_each_setting_once(tmp_path):
    run = tiny_run(steps=4, at_steps=[2, 4], eval={"num_samples": 20, "sampling_steps": [2, 3],
                                                   "cfg_scales": [1.0, 2.0], "metrics": ["fid", "is", "precision"],
                                                   "batch_size": 20})
    run_training(run, tmp_path, stop_at=2)
    recs = list(read_jsonl(tmp_path / "eval.jsonl"))
    assert sorted((r["step"], r["sampling_steps"], r["cfg_scale"]) for r in recs) == [
        (2, 2, 1.0), (2, 2, 2.0), (2, 3, 1.0), (2, 3, 2.0)]
    for r in recs:
        assert r["feature_space"] == "digits" and r["reference"] == "digits" and r["num_samples"] == 20
        assert r["fid"] > 0 and r["inception_score"] >= 1.0 and 0 <= r["precision"] <= 1
        assert r["sfid"] is None and r["recall"] is None  # not requested: recorded as null
        assert r["sampler"] == "ddim" and r["wall_s"] > 0
    (rec,) = (r for r in recs if (r["step"], r["sampling_steps"], r["cfg_scale"]) == (2, 2, 2.0))
    assert RunFolder(tmp_path).samples_npz(rec).exists()   # named by its record's setting
    run_training(run, tmp_path)  # resumes at 2: step 2 already recorded, so only step 4 is added
    run_training(run, tmp_path)  # done: nothing added
    recs = list(read_jsonl(tmp_path / "eval.jsonl"))
    assert len(recs) == 8 and sorted({r["step"] for r in recs}) == [2, 4]
    # the eval checkpoints are kept beyond keep_last
    assert (tmp_path / "checkpoints" / "step_0000002.pt").exists()
    # a setting added later is evaluated from the retained checkpoint of step 2, once
    run.eval.cfg_scales = [1.0, 2.0, 3.0]
    run_training(run, tmp_path)
    recs = list(read_jsonl(tmp_path / "eval.jsonl"))
    assert len(recs) == 12 and sum(r["cfg_scale"] == 3.0 and r["step"] == 2 for r in recs) == 2


def test_eval_paths_expand_environment_variables_when_the_run_starts(tmp_path, monkeypatch):
    from harness.data.datasets import load_digits
    from harness.sampling.npz import save_npz

    images, labels = load_digits()
    save_npz(np.repeat(images[:300, :, :, None], 3, axis=3), labels[:300], tmp_path / "ref" / "digits300.npz")
    monkeypatch.setenv("DIGITS_REF", str(tmp_path / "ref"))
    run = tiny_run(steps=2, at_steps=[2], eval={"num_samples": 20, "metrics": ["fid"], "batch_size": 20,
                                                "reference": "${DIGITS_REF}/digits300.npz"})
    run_training(run, tmp_path / "run")
    (rec,) = read_jsonl(tmp_path / "run" / "eval.jsonl")
    assert rec["reference"] == "${DIGITS_REF}/digits300.npz"  # the record keeps the portable form
    assert rec["features_id"] == "digits" and rec["fid"] > 0


def test_warmup_grad_checkpointing_and_bf16(tmp_path):
    base = tiny_run(steps=2, ckpt_every=2)
    warm = tiny_run(steps=2, ckpt_every=2, warmup_steps=4)
    run_training(warm, tmp_path / "warm")
    assert [r["lr"] for r in read_jsonl(tmp_path / "warm" / "train.jsonl")] == [2.5e-4, 5e-4]
    # gradient checkpointing recomputes the same activations: identical weights
    run_training(base, tmp_path / "plain")
    gc = tiny_run(steps=2, ckpt_every=2, grad_checkpointing=True)
    run_training(gc, tmp_path / "gc")
    assert_bitwise_equal(final_state(tmp_path / "plain", 2), final_state(tmp_path / "gc", 2))
    # bf16 autocast runs (on the CPU too) and trains to a finite, different result
    bf = tiny_run(steps=2, ckpt_every=2, precision="bf16")
    run_training(bf, tmp_path / "bf16")
    a, b = final_state(tmp_path / "bf16", 2), final_state(tmp_path / "plain", 2)
    assert all(torch.isfinite(v).all() for v in a["model"].values())
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
