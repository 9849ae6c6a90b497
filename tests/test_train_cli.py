"""`harness train`: a standalone run from --model, then a rerun from its run.json."""
from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.io import read_jsonl




@pytest.mark.slow
def test_standalone_train_writes_the_run_record_and_resumes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), "--model", "DiT-2x32x2/2", "--steps", "3",
                 "--batch", "8", "--lr", "1e-3"]) == 0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["model"] == "DiT-2x32x2/2" and run["train"]["steps"] == 3 and run["train"]["global_batch"] == 8
    assert run["sweep"] == "standalone" and "/" not in run["run_id"]
    assert json.loads((run_dir / "done").read_text())["step"] == 3
    assert [r["step"] for r in read_jsonl(run_dir / "train.jsonl")] == [3]
    evals = list(read_jsonl(run_dir / "eval.jsonl"))
    assert [e["step"] for e in evals] == [3] and evals[0]["fid"] is not None
    # a second call from run.json is a no-op; overriding a recorded run is refused with a clear error
    assert main(["train", "--run-dir", str(run_dir)]) == 0
    assert len(list(read_jsonl(run_dir / "eval.jsonl"))) == 1
    assert main(["train", "--run-dir", str(run_dir), "--steps", "10"]) == 2
    assert "run.json exists" in capsys.readouterr().err


def test_train_without_model_or_run_json_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "run.json not found" in err and "--model" in err
