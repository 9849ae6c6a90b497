"""Damaged run folders (issue 28, findings 4 and 5): a damaged run.json of a finished run and a
checkpoint without its checksum sidecar are seen by `status`, repaired by `sweep` (which says so),
and never make `export` take an older step in silence."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from harness.launch import repair
from harness.errors import HarnessError
from harness.interop.convert import _run_checkpoint
from harness.config.layout import RunFolder, sidecar_path
from harness.training.train import run_training
from train_tiny import final_state, tiny_run


@pytest.fixture
def finished(tmp_path):
    """A finished 4-step tiny run (checkpoints at 2 and 4) and a copy of its final state."""
    run, rdir = tiny_run(steps=4), tmp_path / "run"
    run_training(run, rdir)
    assert RunFolder(rdir).done.exists() and repair.damage(run, rdir) is None
    return run, rdir, final_state(rdir, 4)


@pytest.mark.parametrize("damage", ["{not json", "[]", '{"run_id": "x"}', "other-run"])
def test_a_damaged_run_json_is_named_and_rewritten_from_the_spec_keeping_the_rest(finished, damage, caplog):
    run, rdir, _ = finished
    folder = RunFolder(rdir)
    good = json.loads(folder.run_json.read_text())
    kept = {p.name: p.read_bytes() for p in folder.checkpoints.iterdir()}
    text = json.dumps({**good, "run_id": "other"}) if damage == "other-run" else damage
    folder.run_json.write_text(text)
    assert "run.json" in repair.damage(run, rdir) and "`harness sweep` repairs it" in repair.damage(run, rdir)
    with caplog.at_level(logging.WARNING, logger="harness.launch.repair"):
        [line] = repair.repair(run, rdir)
    assert "rewrote it from the spec" in line and line in caplog.text
    assert json.loads(folder.run_json.read_text()) == good and repair.damage(run, rdir) is None
    assert {p.name: p.read_bytes() for p in folder.checkpoints.iterdir()} == kept and folder.done.exists()


def test_a_whole_checkpoint_without_its_sidecar_is_reverified_and_sealed(finished):
    run, rdir, _ = finished
    side = sidecar_path(RunFolder(rdir).checkpoint(4))
    sealed = side.read_text()
    side.unlink()
    assert repair.damage(run, rdir).startswith("step_0000004.pt has no checksum file")
    # export refuses instead of taking step 2 in silence
    with pytest.raises(HarnessError, match=r"step_0000004.pt: the run's newest checkpoint is not valid \(no checksum"
                                           r".*re-verifies or quarantines it, or pass .*step_0000002.pt"):
        _run_checkpoint(rdir)
    [line] = repair.repair(run, rdir)
    assert "its checksum was written" in line and side.read_text() == sealed
    assert repair.damage(run, rdir) is None and _run_checkpoint(rdir) == RunFolder(rdir).checkpoint(4)


@pytest.mark.parametrize("damage", ["truncated", "wrong-step", "nan"])
def test_a_broken_final_checkpoint_without_sidecar_is_quarantined_and_the_run_retrains(finished, damage):
    run, rdir, original = finished
    folder = RunFolder(rdir)
    path = folder.checkpoint(4)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    else:
        state = torch.load(path, weights_only=True)
        if damage == "wrong-step":
            state["step"] = 3
        else:
            next(iter(state["ema"].values())).fill_(float("nan"))
        torch.save(state, path)
    sidecar_path(path).unlink()
    [line] = repair.repair(run, rdir)
    assert "quarantined as step_0000004.pt.corrupt" in line and "trains again" in line, line
    assert not path.exists() and path.with_name(path.name + ".corrupt").exists() and not folder.done.exists()
    run_training(run, rdir)  # resumes from step 2
    again = final_state(rdir, 4)
    for key in ("model", "ema"):
        assert all(torch.equal(again[key][k], original[key][k]) for k in original[key])
    assert folder.done.exists() and repair.damage(run, rdir) is None


def test_an_older_checkpoint_without_sidecar_keeps_the_run_done(finished):
    run, rdir, _ = finished
    path = RunFolder(rdir).checkpoint(2)
    path.write_bytes(b"garbage")
    sidecar_path(path).unlink()
    [line] = repair.repair(run, rdir)
    assert "quarantined" in line and "trains again" not in line and RunFolder(rdir).done.exists()


@pytest.mark.slow
def test_status_shows_damage_and_sweep_repairs_it_so_the_report_loads(tmp_path, caplog):
    """Through a real (debug) sweep: before the repair `status` says damaged and the report's loader
    gives the fix; `sweep` repairs it, says so, and the run is done again with nothing retrained."""
    from harness.launch.dispatch import dispatch
    from harness.study.results import load_sweep
    from harness.config.spec import load_spec
    from harness.launch.status import run_statuses
    from test_dispatch import tiny

    results, spec = tmp_path / "results", load_spec(tiny(tmp_path))
    [status] = dispatch(spec, results, "debug")
    folder = RunFolder(status.dir)
    train_log = folder.train_log.read_text()
    folder.run_json.write_text('{"run_id": ')
    sidecar_path(folder.checkpoint(10)).unlink()
    [seen] = run_statuses(spec, results)
    assert seen.state == "damaged" and "run.json is unreadable" in seen.reason and "step_0000010.pt" in seen.reason
    with pytest.raises(HarnessError, match="run `harness sweep` on its spec: it rewrites run.json"):
        load_sweep(results, spec.name)
    with caplog.at_level(logging.WARNING, logger="harness.launch.repair"):
        [again] = dispatch(spec, results, "debug")
    assert again.state == "done" and "rewrote it from the spec" in caplog.text and "checksum was written" in caplog.text
    assert folder.train_log.read_text() == train_log  # nothing was retrained
    assert load_sweep(results, spec.name).frame["fid"].notna().all()
