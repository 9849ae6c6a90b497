"""The paired FID difference (harness.metrics.stats.fid_difference; the rule in that module's docstring) against
its claims: (a) its 90% interval covers a known difference 90% of the time; (b) on paired sets its error is the
smaller; (c) sets that are not paired are refused by the provenance check (harness.study.pairing), and the
comparison falls back to the combined error -- on records and features the evaluator itself wrote."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from harness.config import layout
from harness.config.vocab import FID_FEATURES
from harness.io import read_jsonl
from harness.metrics.stats import FID_BOOTSTRAP, fid_bootstrap, fid_difference, frechet_distance, gaussian_stats
from harness.study import analysis
from harness.study.pairing import pairing_problem

# Fixed before the first run. R independent paired draws of N samples in the digits feature space, each judged with
# the product's n_boot; the 90% interval d +- 1.645 se_paired must cover the true difference in a fraction within
# 3 binomial standard deviations of 0.90: 0.90 +- 3 sqrt(0.9 * 0.1 / 400) = [0.855, 0.945]. (With 20 resamples the
# error itself has ~19 degrees of freedom, which alone puts the expected coverage at P(|t_19| < 1.645) = 0.884.)
# The truth: the mean difference over M further independent draws, whose own error (sd / sqrt(2000) < 0.03 sd) is
# negligible beside the intervals' half-width of 1.645 sd.
R, N, M = 400, 1000, 2000
BAND = (0.90 - 3 * np.sqrt(0.09 / R), 0.90 + 3 * np.sqrt(0.09 / R))


@pytest.fixture(scope="module")
def digits():
    """Real digits features (1797, 32) with their labels, and the reference statistics the product uses."""
    from harness.data.datasets import load_digits
    from harness.metrics import get_feature_extractor, load_reference

    ref = load_reference("digits", get_feature_extractor("digits", device="cpu"), image_size=8)
    _, labels = load_digits()
    return ref.pool_features().astype(np.float64), labels, ref.mu, ref.sigma


def _draw(feats: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two generators of N samples driven by one noise: sample i has label i mod 10 (balanced, as evaluation draws
    them), a real digit r_i of that label and a Gaussian z_i, both shared; a = F[r_i] + 0.5 sd z_i, b = F[r_i] +
    0.6 sd z_i + 0.1 sd (sd: each feature's spread over the real digits)."""
    sd = feats.std(axis=0)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    r = np.array([rng.choice(by_class[i % 10]) for i in range(N)])
    z = rng.standard_normal((N, feats.shape[1]))
    return feats[r] + 0.5 * sd * z, feats[r] + 0.6 * sd * z + 0.1 * sd


def _fid(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(x), mu, sigma)


@pytest.mark.slow
def test_the_paired_interval_covers_the_true_difference_90_percent_of_the_time(digits):
    feats, labels, mu, sigma = digits
    truth_rng, rng = np.random.default_rng(1), np.random.default_rng(2)
    truth = np.mean([_fid(a, mu, sigma) - _fid(b, mu, sigma) for a, b in
                     (_draw(feats, labels, truth_rng) for _ in range(M))])
    paired_hits = combined_hits = 0
    ratios = []
    for rep in range(R):
        a, b = _draw(feats, labels, rng)
        d = fid_difference(a, b, mu, sigma, n_boot=FID_BOOTSTRAP, seed=rep)
        # the combined error as the product records it: each FID's own bootstrap
        combined = np.hypot(fid_bootstrap(a, mu, sigma, seed=rep)["fid_se"],
                            fid_bootstrap(b, mu, sigma, seed=rep + R)["fid_se"])
        paired_hits += abs(d["fid_diff"] - truth) <= analysis.RESOLVE_Z * d["fid_diff_se"]
        combined_hits += abs(d["fid_diff"] - truth) <= analysis.RESOLVE_Z * combined
        ratios.append(d["fid_diff_se"] / combined)
    rate, rate_combined = paired_hits / R, combined_hits / R
    print("paired calibration:", json.dumps({"R": R, "N": N, "truth": truth, "band": BAND, "paired_coverage": rate,
                                             "combined_coverage": rate_combined,
                                             "se_ratio_median": float(np.median(ratios))}))
    assert BAND[0] <= rate <= BAND[1], (rate, BAND)
    # (b) power: the paired error is the smaller; the combined one overstates, so its interval over-covers
    # beyond the band -- the check above would fail an error as wrong as that
    assert np.median(ratios) < 1 and max(ratios) < 1
    assert rate_combined > BAND[1]


def test_fid_difference_is_the_difference_and_refuses_sets_of_other_shapes():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 4)), rng.standard_normal((300, 4)) + 0.2
    mu, sigma = np.zeros(4), np.eye(4)
    d = fid_difference(a, b, mu, sigma, n_boot=10, seed=0)
    assert d["fid_diff"] == pytest.approx(_fid(a, mu, sigma) - _fid(b, mu, sigma), rel=1e-12)
    assert d["fid_diff_se"] > 0 and d["fid_diff_boot"] == 10
    assert fid_difference(a, a, mu, sigma, n_boot=10)["fid_diff_se"] == 0.0   # a set against itself: no noise
    with pytest.raises(Exception, match="one shape"):
        fid_difference(a, b[:299], mu, sigma)


# ------------------------------------------------------------- records and features the evaluator wrote
EVAL = dict(num_samples=200, batch_size=100, sampling_steps=[5], cfg_scales=[1.0], metrics=["fid"])


def _evaluate(results, name: str, seed: int, model_seed: int, sampler: str = "ddim"):
    """One run folder of sweep 'pair' evaluated at step 4 by the product's evaluator: its run.json and records."""
    import torch

    from harness.training.evaluator import evaluate_step
    from harness.training.runtime import Dist
    from train_tiny import nudged_tiny_dit, tiny_run

    base = tiny_run(at_steps=[4], eval={**EVAL, "sampler": sampler})
    run = dataclasses.replace(base, run_id=name, sweep="pair", seed=seed)
    rdir = layout.run_dir(results, "pair", name)
    ema = nudged_tiny_dit(model_seed).eval()
    layout.write_run_json(run, rdir, gflops=1.0, params=sum(p.numel() for p in ema.parameters()))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert evaluate_step(run, rdir, ema, Dist(), 4) == 1
    finally:
        torch.set_num_threads(old)
    (rec,) = read_jsonl(layout.RunFolder(rdir).eval_log)
    return rdir, rec


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Three evaluations of one step: two models with the run seed 0 (paired: one noise seed), and the first model
    again with run seed 1 (other noise, same N, labels and everything else)."""
    results = tmp_path_factory.mktemp("results")
    return results, {name: _evaluate(results, name, seed, model)
                     for name, seed, model in (("a", 0, 0), ("b", 0, 1), ("a-seed1", 1, 0))}


def test_records_prove_pairing_only_where_the_noise_is_shared(written):
    _, runs = written
    (_, a), (_, b), (_, other) = runs["a"], runs["b"], runs["a-seed1"]
    assert pairing_problem(a, b) is None
    # (c) the planted error: another seed's samples, the same in everything else the eye checks
    assert a["num_samples"] == other["num_samples"] and a["labels"] == other["labels"]
    assert pairing_problem(a, other) == "noise_seed differs"
    older = {k: v for k, v in b.items() if k not in ("noise_seed", "noise_scheme", "noise_shape", "labels")}
    assert pairing_problem(a, older) == "no noise_seed recorded"      # a record from before the keys existed
    assert pairing_problem(a, {**b, "num_samples": 100}) == "num_samples differs"
    ddpm = {**b, "sampler": "ddpm", "sample_batch": 50}
    assert pairing_problem({**a, "sampler": "ddpm"}, ddpm) == "sample_batch differs (step noise not shared)"


def test_the_verdict_uses_the_paired_error_only_for_provably_paired_rows(written):
    """Through the product's path: load_sweep -> per_model rows -> analysis.verdict with the report's
    PairedErrors, which reads the features files named in the records."""
    from harness.report.paired import PairedErrors
    from harness.study.results import load_sweep

    results, runs = written
    res = load_sweep(results, "pair")
    rows = {r["run_id"]: r for _, r in res.frame.iterrows()}
    errors = PairedErrors({r["run_id"]: r for r in res.runs})
    paired = analysis.verdict(rows["a"], rows["b"], errors)
    combined = float(np.hypot(rows["a"]["fid_se"], rows["b"]["fid_se"]))
    assert paired.paired and 0 < paired.se < combined, (paired, combined)
    print("tiny models, paired / combined error:", paired.se / combined)
    planted = analysis.verdict(rows["a"], rows["a-seed1"], errors)
    assert not planted.paired and planted.se == pytest.approx(
        float(np.hypot(rows["a"]["fid_se"], rows["a-seed1"]["fid_se"])))
    assert errors.reasons == {"noise_seed differs": 1} and errors.paired == 1
    # the stored features are the ones the record's FID came from
    from harness.metrics import get_feature_extractor, load_reference

    feats = np.load(rows["a"]["fid_features"], allow_pickle=False)
    assert feats.shape == (200, FID_FEATURES["digits"][0]) and feats.dtype == np.float32   # what the plan sizes
    ref = load_reference("digits", get_feature_extractor("digits", device="cpu"), image_size=8)
    assert _fid(feats, ref.mu, ref.sigma) == pytest.approx(rows["a"]["fid"], rel=1e-9)


def test_a_paired_error_is_computed_once_and_again_only_when_a_features_file_changes(written, monkeypatch, tmp_path):
    """The report's cache on disk: a second render reads the pair's error back; a rewritten features file (new
    size or mtime) is computed afresh."""
    import os

    import harness.metrics.stats as stats_mod
    from harness.report.paired import PairedErrors
    from harness.study.results import load_sweep

    results, _ = written
    res = load_sweep(results, "pair")
    rows = {r["run_id"]: r for _, r in res.frame.iterrows()}
    real, calls = stats_mod.fid_difference, []
    monkeypatch.setattr(stats_mod, "fid_difference", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))   # an empty cache: the first render computes
    se = [PairedErrors({r["run_id"]: r for r in res.runs})(rows["a"], rows["b"]) for _ in range(2)]
    assert se[0] == se[1] and se[0] > 0 and len(calls) == 1
    st = os.stat(rows["b"]["fid_features"])
    os.utime(rows["b"]["fid_features"], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = PairedErrors({r["run_id"]: r for r in res.runs})(rows["a"], rows["b"])
    assert again == se[0] and len(calls) == 2


def test_features_are_stored_as_float16_only_in_inception_space_and_only_when_they_fit():
    from harness.metrics.features import stored_features

    pool = np.random.default_rng(0).random((5, 3), dtype=np.float32)
    assert stored_features(pool, "inception").dtype == np.float16
    assert stored_features(pool, "digits").dtype == np.float32
    assert np.array_equal(stored_features(pool, "digits"), pool)
    assert stored_features(pool * 1e5, "inception").dtype == np.float32     # beyond float16's 65,504: kept whole


def test_a_record_names_its_features_file_only_inside_features(tmp_path):
    from harness.errors import HarnessError

    folder = layout.RunFolder(tmp_path)
    assert folder.features_file("fid_step_0000004_k5_cfg1_0123abcd.npy") == tmp_path / "features" / \
        "fid_step_0000004_k5_cfg1_0123abcd.npy"
    for hostile in ("../eval.jsonl", "/etc/passwd", "", "..", 7):
        with pytest.raises(HarnessError, match="not a file name of features/"):
            folder.features_file(hostile)
