"""Known answers for what only training quality would reveal (issue 16): the EMA step with the spec's
decay, the class-dropout rate the spec asks for, and evaluation with the EMA weights. Each test goes
through `run_training` (the code path a sweep job runs) and reads what it wrote."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.io import read_jsonl
from harness.models import dit
from harness.training.train import run_training
from train_tiny import final_state, tiny_run
from tolerance import fp32_bound, rel_err


@pytest.mark.parametrize("decay", [0.8, 0.37])
def test_one_ema_step_is_the_formula_with_the_spec_decay(tmp_path, decay):
    """ema_2 = d * ema_1 + (1 - d) * model_2, with d = train.ema_decay, parameter by parameter."""
    run = tiny_run(steps=2, ema_decay=decay, ckpt_every=1, keep_last=2)
    run_training(run, tmp_path)
    one, two = final_state(tmp_path, 1), final_state(tmp_path, 2)
    moved = 0
    for name, ema2 in two["ema"].items():
        if not ema2.is_floating_point() or name == "pos_embed":  # pos_embed is a fixed, frozen table
            continue
        want = decay * one["ema"][name].double() + (1 - decay) * two["model"][name].double()
        # float32 EMA vs the float64 formula: the decay's rounding to float32, two products and a sum, relative
        # to the tensor's scale (an atol on weights up to ~1 is a few ulps there, and the rtol 1e-5 per entry far more)
        assert rel_err(ema2, want) < fp32_bound(4), f"ema.{name}"
        moved += float((one["ema"][name] - two["model"][name]).abs().max()) > 1e-4
    # where the old average and the new weights differ, another decay (or swapped weights) gives
    # another answer, so the check has teeth on these tensors
    assert moved >= 5, moved


def _null_class_counts(monkeypatch, run, tmp_path) -> tuple[int, int]:
    """Run `run`; return (labels that reached the label embedding table as the null class, labels)
    over every training forward (micro-batches included), whatever decided the drop."""
    counts = [0, 0]
    original = dit.LabelEmbedder.forward

    def record(table, args):
        if table.training:
            counts[0] += int((args[0] == table.num_embeddings - 1).sum())
            counts[1] += args[0].numel()

    def spy(self, y, force_drop=None):
        if not getattr(self, "_spied", False):
            self._spied = True
            self.embedding_table.register_forward_pre_hook(record)
        return original(self, y, force_drop)

    monkeypatch.setattr(dit.LabelEmbedder, "forward", spy)
    run_training(run, tmp_path)
    return counts[0], counts[1]


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_class_dropout_rate_matches_the_spec_within_its_binomial_interval(tmp_path, monkeypatch, rate):
    """One step of 4096 labels: the share replaced by the null class is train.class_dropout within
    4.5 binomial standard deviations (a false alarm once in ~150,000 runs)."""
    n = 4096
    # the whole batch in one pass: micro_batch auto's start-up probe would send one more label through
    run = tiny_run(steps=1, global_batch=n, class_dropout=rate, micro_batch=n)
    nulls, seen = _null_class_counts(monkeypatch, run, tmp_path)
    assert seen == n  # one step: every label of the global batch passed the embedder once
    dropped = nulls / seen
    half_width = 4.5 * math.sqrt(rate * (1 - rate) / n)
    assert abs(dropped - rate) < half_width, f"dropped {dropped:.4f}, want {rate} +- {half_width:.4f}"


@pytest.mark.slow
def test_evaluation_and_grids_in_training_use_the_ema_weights(tmp_path):
    """The samples training writes at an eval step equal those of a model loaded with the
    checkpoint's EMA weights, and differ from those of the raw weights."""
    from harness.training.evaluator import evaluate_step, save_grid
    from harness.models.runmodel import model_from_checkpoint

    ev = {"num_samples": 20, "sampling_steps": [5], "metrics": ["fid"], "batch_size": 20}
    run = tiny_run(steps=3, at_steps=[3], ema_decay=0.5, lr=3e-3, eval=ev)
    run_training(run, tmp_path / "trained")
    ckpt = tmp_path / "trained" / "checkpoints" / "step_0000003.pt"
    from harness.config.layout import samples_name
    from harness.training.evaluation import eval_settings

    (setting,) = eval_settings(run, 3)
    name = samples_name(setting)
    with np.load(tmp_path / "trained" / "samples" / name) as f:
        trained = f["arr_0"]
    grid_trained = (tmp_path / "trained" / "samples" / "grid_step_0000003.png").read_bytes()
    from harness.training.runtime import Dist

    dist = Dist(device=torch.device("cpu"))  # one rank: evaluation runs on every rank of a job
    got = {}
    for use_ema in (True, False):
        model, _, _ = model_from_checkpoint(ckpt, use_ema=use_ema)
        folder = tmp_path / ("ema" if use_ema else "raw")
        assert evaluate_step(run, folder, model, dist, 3) == 1
        with np.load(folder / "samples" / name) as f:
            got[use_ema] = f["arr_0"]
        got[use_ema, "grid"] = save_grid(run, folder, model, dist, 3).read_bytes()
        got[use_ema, "fid"] = next(iter(read_jsonl(folder / "eval.jsonl")))["fid"]
    assert not np.array_equal(got[True], got[False]), "EMA and raw weights sample alike: the test has no teeth"
    np.testing.assert_array_equal(trained, got[True])
    assert grid_trained == got[True, "grid"]
    trained_fid = next(iter(read_jsonl(tmp_path / "trained" / "eval.jsonl")))["fid"]
    assert trained_fid == pytest.approx(got[True, "fid"], rel=1e-6)


def test_ema_update_on_parameters_and_buffers():
    """The formula on parameters, and buffers (BatchNorm running statistics) copied, not averaged."""
    from harness.training.runtime import ema_update

    torch.manual_seed(0)
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        for p in (*model.parameters(), *ema.parameters()):
            p.copy_(torch.randn_like(p))
    model(torch.randn(8, 3))  # moves the running statistics of `model` only
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update(ema, model, 0.75)
    for name, p in model.named_parameters():
        torch.testing.assert_close(getattr(ema, name), 0.75 * before[name] + 0.25 * p)
    for name, b in model.named_buffers():
        assert torch.equal(getattr(ema, name), b), name
    assert not torch.equal(before["running_mean"], model.running_mean)
