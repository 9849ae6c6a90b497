"""Command-line overrides (`harness sweep|plan|status|train SPEC key=value ...`): validated like the file,
errors that name the override, the effective spec recorded in results/<sweep>/spec.yaml, and run ids that
follow exactly the values that enter a run's identity."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.config.layout import SPEC_YAML, SWEEP_JSON, run_dir, sweep_dir
from harness.config.spec import load_spec
from test_sweep_e2e import SMOKE, ROOT, subprocess_env


def _ids(spec) -> list[str]:
    return [r.run_id for r in spec.expand()]


def test_identity_overrides_change_run_ids_and_bookkeeping_ones_do_not():
    base = load_spec(SMOKE)
    lr = load_spec(SMOKE, ["train.lr=2e-4"])
    assert lr.train.lr == 2e-4 and isinstance(lr.train.lr, float)
    assert all(a != b and a.rsplit("_", 1)[0] == b.rsplit("_", 1)[0] for a, b in zip(_ids(base), _ids(lr)))
    kept = load_spec(SMOKE, ["train.ckpt_every=5", "launcher.timeout_min=30", "eval.num_samples=50",
                             "train.steps=40", "eval.at_steps=[20,40]"])
    assert _ids(kept) == _ids(base)
    assert (kept.train.ckpt_every, kept.launcher.timeout_min, kept.eval.at_steps) == (5, 30, [20, 40])
    assert load_spec(SMOKE, ["models=[DiT-2x32x2/4]"]).models == ["DiT-2x32x2/4"]
    # the last of two overrides of one key wins, as on any command line
    assert load_spec(SMOKE, ["train.lr=1", "train.lr=3e-4"]).train.lr == 3e-4


@pytest.mark.parametrize("override, needle", [
    ("train.lr=abc", "train.lr: expected a number, got a string 'abc'"),
    ("train.lrr=1", "train.lrr: unknown key. Fix: did you mean 'lr'?"),
    ("eval.at_steps=[10, 99]", "eval.at_steps[1]: step 99 is beyond train.steps 30"),
    ("train.lr.x=1", "train.lr is a number, not a section with keys"),
    ("train.lr", "expected KEY=VALUE"),
    ("train.lr=[1,", "the value is not valid YAML"),
])
def test_a_bad_override_is_one_line_naming_it(override, needle):
    with pytest.raises(HarnessError) as err:
        load_spec(SMOKE, [override])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
    if "=" in override and not override.startswith("train.lr=["):
        assert f"override '{override}'" in msg and f"{SMOKE}:" not in msg.replace(f"{SMOKE}: override", "")


def test_the_cli_refuses_a_bad_override_with_exit_2_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "harness", "plan", str(SMOKE), "train.global_batch=-4"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: {SMOKE}: override 'train.global_batch=-4': train.global_batch: "
                                   "must be >= 1, got -4. Fix: use a value >= 1.")


@pytest.mark.slow
def test_a_sweep_with_overrides_records_them_in_spec_yaml_and_run_json(tmp_path):
    """A real sweep (local submitit processes) with overrides: spec.yaml read back gives the same runs,
    run.json holds the overridden values, and the run ids are the overridden spec's."""
    overrides = ["name=smoke-ov", "models=[DiT-2x32x2/4]", "train.lr=5e-4", "train.steps=6", "train.ckpt_every=3",
                 "eval.at_steps=[6]", "eval.num_samples=20", "eval.batch_size=20"]
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "harness", "sweep", str(SMOKE), *overrides, "--launcher", "local",
                           "--results", str(results), "--no-report"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = load_spec(SMOKE, overrides)
    sdir = sweep_dir(results, "smoke-ov")
    recorded = load_spec(sdir / SPEC_YAML)  # the effective spec, loadable as a spec of its own
    assert recorded.name == "smoke-ov" and _ids(recorded) == _ids(expected)
    assert recorded.train.lr == 5e-4 and recorded.eval.at_steps == [6]
    assert json.loads((sdir / SWEEP_JSON).read_text())["runs"] == _ids(expected)
    (run,) = expected.expand()
    record = json.loads((run_dir(results, "smoke-ov", run.run_id) / "run.json").read_text())
    assert record["train"]["lr"] == 5e-4 and record["train"]["steps"] == 6
    assert (run_dir(results, "smoke-ov", run.run_id) / "done").exists()
    assert run.run_id not in _ids(load_spec(SMOKE))


def test_standalone_train_overrides_enter_the_run_and_its_id(tmp_path, capsys):
    from harness import cli

    def train(rdir: Path, *extra: str) -> dict:
        assert cli.main(["train", "--run-dir", str(rdir), "--model", "DiT-2x32x2/4", "--steps", "2", "--batch", "8",
                         *extra]) == 0
        return json.loads((rdir / "run.json").read_text())

    plain = train(tmp_path / "plain", "eval.at_steps=[0]", "eval.num_samples=10")
    tuned = train(tmp_path / "tuned", "eval.at_steps=[0]", "eval.num_samples=10", "train.weight_decay=0.01")
    assert tuned["train"]["weight_decay"] == 0.01 and plain["train"]["weight_decay"] == 0.0
    assert tuned["run_id"] != plain["run_id"]
    capsys.readouterr()
    assert cli.main(["train", "--run-dir", str(tmp_path / "tuned"), "train.lr=1"]) == 2
    assert "KEY=VALUE only apply to a new standalone run" in capsys.readouterr().err
    assert cli.main(["train", "--run-dir", str(tmp_path / "bad"), "--model", "DiT-2x32x2/4", "train.nope=1"]) == 2
    assert "harness train: override 'train.nope=1': train.nope: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
