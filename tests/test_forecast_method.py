"""Known-answer tests of the default forecasting method and its prediction interval.

Tolerances, stated before running:
- interval of a correctly specified law (power law, 10 runs, 3% noise), N_DRAWS = 200 extrapolations:
  the nominal 90% interval must cover between 0.9 - 5 sd and 0.98 of them (sd = sqrt(0.9 x 0.1 / 200)
  = 0.021, so >= 0.80: a 25th-75th percentile interval, ~50%, fails), and its median half-width must
  be under twice the oracle's (1.645 x the true noise, in log FID): an interval made wide enough to
  cover everything fails.
- the default method on a synthetic Table 4 (the paper's 4 sizes x 3 patches, a known two-factor law,
  3% noise), every hold-out family, 3 draws: pooled coverage of the 90% intervals >= 80% (the issue's
  target; the draws share their truth, so this is a target, not a binomial test).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.study import forecast, laws

LEVEL, NOISE, N_DRAWS = 0.9, 0.03, 200
LOWER = LEVEL - 5 * np.sqrt(LEVEL * (1 - LEVEL) / N_DRAWS)
UPPER = 0.98


def _power_draws(level: float) -> tuple[float, float]:
    """Coverage and median half-width (log FID) of `level` intervals over N_DRAWS noisy power laws,
    each fitted to 10 runs and predicting an 11th, 2x beyond the largest."""
    rng = np.random.default_rng(2024)
    c = np.geomspace(1, 100, 10)
    c_new = np.array([200.0])
    hits, halves = 0, []
    for _ in range(N_DRAWS):
        y = 80 * c ** -0.3 * np.exp(rng.normal(0, NOISE, len(c)))
        y_new = 80 * c_new ** -0.3 * np.exp(rng.normal(0, NOISE, 1))
        f = laws.fit(laws.Choice("power", "log", "squares"), {"compute": c}, y, loo=True)
        lo, hi = f.interval({"compute": c_new}, level)
        hits += bool(lo[0] <= y_new[0] <= hi[0])
        halves.append(np.log(hi[0] / lo[0]) / 2)
    return hits / N_DRAWS, float(np.median(halves))


def test_prediction_interval_covers_at_its_nominal_rate():
    cover, half = _power_draws(LEVEL)
    oracle = stats.norm.ppf((1 + LEVEL) / 2) * NOISE
    assert LOWER <= cover <= UPPER, cover
    assert half < 2 * oracle, (half, oracle)


def test_a_planted_quartile_interval_fails_the_coverage_check():
    """The same check with a 25th-75th percentile interval (level 0.5) must fail: the test can fail."""
    cover, _ = _power_draws(0.5)
    assert cover < LOWER, cover


def test_an_interval_made_to_cover_everything_fails_the_width_check():
    _, half = _power_draws(0.999)
    assert half >= 2 * stats.norm.ppf((1 + LEVEL) / 2) * NOISE, half


def synthetic_table4(seed: int, noise: float = NOISE) -> pd.DataFrame:
    """The paper's design (parameters and tokens of Table 4's 12 models) with FIDs from a known
    two-factor law: 5 + 60 (N/1e8)^-0.3 + 40 (T/64)^-0.7, times lognormal noise."""
    from harness.study.forecast_table import paper_points

    pts = paper_points()
    truth = 5 + 60 * (pts["params"] / 1e8) ** -0.3 + 40 * (pts["tokens"] / 64) ** -0.7
    return pts.assign(fid=truth * np.exp(np.random.default_rng(seed).normal(0, noise, len(pts))))


def test_default_rule_depends_on_the_design_only():
    pts = synthetic_table4(0)
    assert forecast.default_choice(pts).law == "two-factor"
    assert forecast.default_choice(pts.assign(fid=pts["fid"][::-1].to_numpy())) == forecast.default_choice(pts)
    two_patches = pts[pts["patch"] != 8]             # 2 token values: the token term is not determined
    assert forecast.default_choice(two_patches).law == "saturating"
    assert forecast.default_choice(pts.head(5)).law == "power"


@pytest.mark.slow
def test_default_method_covers_on_every_synthetic_hold_out_family():
    rows = []
    for seed in (101, 102, 103):
        rows += forecast.evaluate_families(synthetic_table4(seed))["rows"]
    cover = np.mean([r["covered"] for r in rows])
    assert len(rows) == 3 * 46 and cover >= 0.80, cover
