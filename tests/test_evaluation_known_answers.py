"""Evaluation at training steps against known answers (issue 16), in one process: which settings a
run asks for and which are recorded, the exact record evaluate_step appends, its samples rebuilt from
sample_images with the documented seeds and labels, its metrics recomputed from those samples, the
grid, and which steps pending_evals evaluates from which weights."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from harness.training import evaluation as protocol
from harness.training import evaluator as ev_mod
from harness.models.checkpoint import save_checkpoint
from harness.training.evaluation import TAG_EVAL, eval_progress, eval_settings, missing_settings, setting_key
from harness.training.evaluator import evaluate_step, pending_evals, save_grid
from harness.io import append_jsonl, read_jsonl
from harness.training.runtime import Dist, derive_seed
from harness.sampling.sample import NOISE_SCHEME, balanced_labels, sample_images
from harness.config.layout import RunFolder, features_name
from train_tiny import nudged_tiny_dit, tiny_run

EVAL = dict(num_samples=7, batch_size=3, sampler="ddpm", sampling_steps=[2, 3], cfg_scales=[1.0, 2.5],
            metrics=["fid", "precision", "recall"])


def _ema(seed: int = 0) -> torch.nn.Module:
    return nudged_tiny_dit(seed).eval()


def test_the_settings_a_run_asks_for_and_their_keys():
    run = tiny_run(at_steps=[4, 8], eval=EVAL)
    got = eval_settings(run, 4)
    assert got == [{"step": 4, "num_samples": 7, "sampling_steps": k, "sampler": "ddpm", "cfg_scale": c,
                    "guidance_channels": 3, "feature_space": "digits", "reference": "digits"}
                   for k in (2, 3) for c in (1.0, 2.5)]
    assert all(type(s["sampling_steps"]) is int and type(s["cfg_scale"]) is float for s in got)
    base = got[0]
    assert setting_key(base) == ("4", "7", "2", "ddpm", "1.0", "3", "digits", "digits")
    assert setting_key({**base, "fid": 3.0, "wall_s": 9}) == setting_key(base)   # measurements are no part of it
    for key in protocol.SETTING_KEYS:
        assert setting_key({**base, key: "other"}) != setting_key(base), key


def test_missing_settings_and_progress_follow_what_eval_jsonl_holds(tmp_path):
    run = tiny_run(at_steps=[4, 8], eval=EVAL)
    assert missing_settings(run, tmp_path, 4) == eval_settings(run, 4)
    assert eval_progress(run, tmp_path) == (0, 8)
    first, second = eval_settings(run, 4)[:2]
    append_jsonl(tmp_path / "eval.jsonl", {**first, "fid": 1.0})
    append_jsonl(tmp_path / "eval.jsonl", {**second, "fid": 2.0, "num_samples": 99})   # another measurement
    assert missing_settings(run, tmp_path, 4) == eval_settings(run, 4)[1:]
    assert missing_settings(run, tmp_path, 8) == eval_settings(run, 8)
    assert eval_progress(run, tmp_path) == (1, 8)


@pytest.mark.parametrize("sampler", ["ddpm", "heun"])   # heun: two model evaluations per step but the last
def test_evaluate_step_writes_the_rebuildable_samples_and_the_exact_record(tmp_path, sampler, caplog):
    from harness.metrics import get_feature_extractor, load_reference, metrics_from_features
    from harness.sampling.samplers import model_evaluations, provenance

    run = tiny_run(at_steps=[4], eval={**EVAL, "sampling_steps": [2], "cfg_scales": [2.5], "sampler": sampler})
    ema = _ema()
    caplog.set_level("INFO", logger=ev_mod.__name__)
    assert evaluate_step(run, tmp_path, ema, Dist(), 4) == 1
    labels = balanced_labels(7, 10)
    want = sample_images(ema, run, labels, sampling_steps=2, sampler=sampler, cfg_scale=2.5, guidance_channels=3,
                         seed=derive_seed(run.seed, 4, 2, tag=TAG_EVAL), batch_size=3)
    with np.load(RunFolder(tmp_path).samples_npz(eval_settings(run, 4)[0])) as f:
        np.testing.assert_array_equal(f["arr_0"], want)
        assert f["arr_1"].tolist() == labels.tolist()
    extractor = get_feature_extractor("digits")
    feats = extractor.extract(want, 3)
    metrics = metrics_from_features(feats, load_reference("digits", extractor, image_size=8),
                                    extractor, ["fid", "precision", "recall"])
    (rec,) = read_jsonl(tmp_path / "eval.jsonl")
    assert rec.pop("wall_s") >= 0 and rec.pop("time") > 1.7e9
    assert model_evaluations(sampler, 2) == {"ddpm": 2, "heun": 3}[sampler]
    setting = eval_settings(run, 4)[0]
    assert rec == {**setting, "model_evaluations": model_evaluations(sampler, 2), **provenance(sampler),
                   "fid": pytest.approx(metrics["fid"], rel=1e-9), "sfid": None, "inception_score": None,
                   "precision": pytest.approx(metrics["precision"]), "recall": pytest.approx(metrics["recall"]),
                   "fid_se": metrics.get("fid_se"), "features_id": metrics.get("feature_space", extractor.name),
                   "sample_precision": "fp32", "sample_compiled": False, "sample_compile_mode": None, "sample_batch": 3,
                   "ranks": 1, "noise_seed": derive_seed(run.seed, 4, 2, tag=TAG_EVAL), "noise_scheme": NOISE_SCHEME,
                   "noise_shape": [1, 8, 8], "labels": "balanced", "num_classes": 10,
                   "fid_features": features_name(setting)}
    # the FID features beside the record: the samples' own, in sample order, float32 in the digits space
    stored = np.load(RunFolder(tmp_path).features_file(rec["fid_features"]), allow_pickle=False)
    assert stored.dtype == np.float32 and np.array_equal(stored, feats.pool)
    logged = [r.getMessage() for r in caplog.records if r.name == ev_mod.__name__]
    assert logged == ["evaluation: sampling batch 3 (3), fp32, eager; decode and features in chunks of 3",
                      f"eval step 4 {{'sampling_steps': 2, 'cfg_scale': 2.5, 'fid': {rec['fid']!r}}}"]
    assert evaluate_step(run, tmp_path, ema, Dist(), 4) == 0          # recorded: nothing is redone
    assert len(list(read_jsonl(tmp_path / "eval.jsonl"))) == 1


def test_the_grid_is_rank_zeros_balanced_samples_at_the_cheapest_most_guided_setting(tmp_path):
    run = tiny_run(at_steps=[4], eval={**EVAL, "sampler": "ddim"})
    ema = _ema()
    assert save_grid(run, tmp_path / "other", ema, Dist(rank=1, world=2), 4) is None
    assert not (tmp_path / "other").exists()
    path = save_grid(run, tmp_path, ema, Dist(), 4)    # 16 samples by default
    assert path == tmp_path / "samples" / "grid_step_0000004.png"
    want = sample_images(ema, run, balanced_labels(16, 10), sampling_steps=2, sampler="ddim", cfg_scale=2.5,
                         guidance_channels=3, seed=derive_seed(run.seed, 4, tag=TAG_EVAL))
    from harness.sampling.sample import save_grid as write_grid
    assert path.read_bytes() == write_grid(want, tmp_path / "want.png").read_bytes()


def test_pending_evals_uses_each_steps_retained_ema_and_skips_what_it_cannot(tmp_path, caplog, monkeypatch):
    run = tiny_run(at_steps=[2, 3, 4, 6], eval={**EVAL, "sampling_steps": [2], "cfg_scales": [1.0]})
    now, old = _ema(0), _ema(1)
    save_checkpoint(tmp_path / "checkpoints", 2, {"model": old.state_dict(), "ema": old.state_dict(), "step": 2})
    pending_evals(run, tmp_path, now, Dist(), upto=4, current=4)
    recs = {r["step"]: r for r in read_jsonl(tmp_path / "eval.jsonl")}
    assert sorted(recs) == [2, 4]      # 3: no retained checkpoint; 6: later than upto
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "eval step 3 has no retained checkpoint; its evaluation is skipped"]
    for step, model in ((2, old), (4, now)):
        with np.load(RunFolder(tmp_path).samples_npz(eval_settings(run, step)[0])) as f:
            want = sample_images(model, run, balanced_labels(7, 10), sampling_steps=2, sampler="ddpm",
                                 seed=derive_seed(run.seed, step, 2, tag=TAG_EVAL), batch_size=3)
            np.testing.assert_array_equal(f["arr_0"], want)
    assert all(torch.equal(a, b) for a, b in zip(now.state_dict().values(), _ema(0).state_dict().values()))
    before = list(read_jsonl(tmp_path / "eval.jsonl"))
    calls = []
    monkeypatch.setattr(ev_mod, "evaluate_step", lambda *a: calls.append(a[-1]))
    pending_evals(run, tmp_path, now, Dist(), upto=4, current=4)   # nothing missing: nothing even started
    assert calls == [] and list(read_jsonl(tmp_path / "eval.jsonl")) == before


def test_pending_evals_passes_over_recorded_steps_to_later_missing_ones(tmp_path, monkeypatch):
    run = tiny_run(at_steps=[2, 4], eval={**EVAL, "sampling_steps": [2], "cfg_scales": [1.0]})
    for s in eval_settings(run, 2):
        append_jsonl(tmp_path / "eval.jsonl", {**s, "fid": 1.0})
    calls = []
    monkeypatch.setattr(ev_mod, "evaluate_step", lambda run, run_dir, ema, dist, step: calls.append(step))
    pending_evals(run, tmp_path, _ema(), Dist(), upto=4, current=4)
    assert calls == [4]


def test_the_record_times_its_own_setting(tmp_path, monkeypatch):
    """wall_s is the setting's duration; with a counter clock (one tick per read) it is a small whole number."""
    import types

    ticks = iter(range(10**6, 10**7))
    monkeypatch.setattr(ev_mod, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks)),
                                                              time=ev_mod.time.time))
    run = tiny_run(at_steps=[4], eval={**EVAL, "sampling_steps": [2], "cfg_scales": [1.0]})
    evaluate_step(run, tmp_path, _ema(), Dist(), 4)
    (rec,) = read_jsonl(tmp_path / "eval.jsonl")
    assert 1 <= rec["wall_s"] <= 10
