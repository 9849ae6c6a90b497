"""scripts/mutation.py's arithmetic (issue 16): what it counts as killed, survived, equivalent, stale or
unchecked, and the interval it gives a sample. mutmut itself is not needed (nor installed by `make test`)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mutation.py"


@pytest.fixture(scope="module")
def mutation():
    spec = importlib.util.spec_from_file_location("mutation_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(**extra):
    statuses = {"m.x_f__mutmut_1": "killed", "m.x_f__mutmut_2": "survived", "m.x_f__mutmut_3": "timeout",
                "m.x_f__mutmut_4": "survived", "m.x_f__mutmut_5": "survived", "m.x_f__mutmut_6": "killed",
                "m.x_g__mutmut_1": "not checked", "m.x_g__mutmut_2": "no tests"}
    lines = {"m.x_f__mutmut_2": "return a - b", "m.x_f__mutmut_4": "return None", "m.x_f__mutmut_5": "x = 2",
             "m.x_g__mutmut_1": "y = 1", "m.x_g__mutmut_2": "y = 0"}
    return {"wall_s": 12.0, "statuses": statuses, "lines": lines, "sample": 0, **extra}


def test_score_counts_killed_over_checked_without_the_equivalent_ones(mutation):
    equivalent = {"m.x_f__mutmut_4": {"line": "return None", "why": "same"},           # still that line: excluded
                  "m.x_f__mutmut_5": {"line": "x = 3", "why": "judged on another line"},  # renumbered: stale
                  "m.x_f__mutmut_6": {"line": "", "why": "listed, but a test kills it"},
                  "m.x_g__mutmut_1": {"line": "y = 1", "why": "equivalent and not yet checked"}}
    r = mutation.score("m", {}, _summary(lines={**_summary()["lines"], "m.x_f__mutmut_6": ""}), equivalent)
    assert r["mutants"] == 8 and r["equivalent"] == ["m.x_f__mutmut_4", "m.x_f__mutmut_6", "m.x_g__mutmut_1"]
    assert r["stale"] == ["m.x_f__mutmut_5"] and r["killed_equivalent"] == ["m.x_f__mutmut_6"]
    assert r["unchecked"] == 0                       # g_1, unchecked, is listed equivalent
    assert mutation.score("m", {}, _summary(), {})["unchecked"] == 1   # a stopped run: outside the score, reported
    # checked: f_1 killed, f_2 survived, f_3 timeout (killed), f_5 survived (stale entry), g_2 no tests (survived)
    assert r["killed"] == 2 and sorted(r["survived"]) == ["m.x_f__mutmut_2", "m.x_f__mutmut_5", "m.x_g__mutmut_2"]
    assert r["score"] == pytest.approx(2 / 5) and r["interval"] is None


def test_score_keeps_to_the_module_functions_and_gives_a_sample_its_wilson_interval(mutation):
    r = mutation.score("m", {"functions": ["m.x_f__*"]}, _summary(), {})
    assert r["mutants"] == 6 and r["killed"] == 3 and r["score"] == pytest.approx(3 / 6) and r["interval"] is None
    sampled = mutation.score("m", {}, _summary(sample=7), {})   # a sample leaves the rest unchecked
    assert sampled["interval"] == pytest.approx(mutation._wilson(3, 7))


def test_wilson_interval_is_scipys_90_percent_wilson_interval(mutation):
    from scipy.stats import binomtest

    for k, n in ((45, 60), (51, 60), (0, 10), (10, 10), (1, 3)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
        assert mutation._wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-3)   # z = 1.645 vs 1.6449
    assert mutation._wilson(0, 0) == (0.0, 1.0)


def test_report_reprints_the_last_runs_and_fails_under_the_target(mutation, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mutation, "WORK", tmp_path)
    monkeypatch.setattr(mutation, "config", lambda: {"target": 0.85, "modules": {"m": {"mutate": ["m.py"]}},
                                                     "equivalent": {}})
    (tmp_path / "m.json").write_text(json.dumps(_summary()))
    assert mutation.main(["--report", "m"]) == 1
    out = capsys.readouterr().out
    assert "m               3/   7 killed =  42.9%" in out and "PARTIAL: 1 not checked" in out
    assert "survived   m.x_f__mutmut_2: return a - b" in out and "under the 85% target" in out
    assert json.loads((tmp_path / "summary.json").read_text())[0]["killed"] == 3
