"""train.keep_optimizer on real tiny runs: an evaluated step's checkpoint, once not among the newest keep_last,
loses its optimizer state and nothing else; the newest stay whole and resume exactly; a run that could only go
on from a slim checkpoint is refused in one line; every reader of weights and EMA takes a slim checkpoint."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from harness import cli
from harness.config.layout import RunFolder
from harness.errors import HarnessError
from harness.interop.convert import export_diffusers, read_source
from harness.io import read_jsonl
from harness.launch import repair
from harness.launch.job import SweepJob
from harness.models.checkpoint import verify_checkpoint
from harness.models.runmodel import model_from_checkpoint
from harness.training.train import run_training
from train_tiny import as_rank, assert_bitwise_equal, final_state, tiny_run

EVAL = {"num_samples": 7, "batch_size": 7, "sampler": "ddpm", "sampling_steps": [2], "metrics": ["fid"]}


def _run(keep_optimizer: str = "newest", **train):
    """6 steps, a checkpoint every 2, evaluated at each; keep_last 1, so steps 2 and 4 end up older."""
    return tiny_run(steps=6, keep_last=1, at_steps=[2, 4, 6], eval=EVAL, keep_optimizer=keep_optimizer, **train)


def _load(run_dir, step: int) -> dict:
    return final_state(run_dir, step)  # torch.load(weights_only=True), without this harness


def _same(a, b) -> bool:
    """Nested dicts, lists and tensors bitwise equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"slim": trained to step 2, resumed to 4, then to 6 (keep_optimizer newest); "whole": straight to 6 (all);
    "before": {step: the slim run's checkpoint of that step while it was the newest}}."""
    root = tmp_path_factory.mktemp("keep_optimizer")
    before = {}
    for stop in (2, 4, None):
        run_training(_run(), root / "slim", stop_at=stop)
        if stop:
            before[stop] = _load(root / "slim", stop)
    run_training(_run("all"), root / "whole")
    return {"slim": root / "slim", "whole": root / "whole", "before": before}


def test_older_evaluated_checkpoints_lose_only_the_optimizer_state_and_the_newest_resumes_exactly(runs):
    slim, whole = runs["slim"], runs["whole"]
    assert RunFolder(slim).checkpoint_steps() == RunFolder(whole).checkpoint_steps() == [2, 4, 6]
    for step in (2, 4):
        path = RunFolder(slim).checkpoint(step)
        assert verify_checkpoint(path) is None                        # its sidecar rewritten to match
        got, was = _load(slim, step), runs["before"][step]
        assert "opt" not in got and "opt" in was
        assert _same(got, {k: v for k, v in was.items() if k != "opt"})  # weights, EMA, RNG, step, run: bitwise
        assert all(_same(got[k], _load(whole, step)[k]) for k in ("model", "ema"))   # and as under `all`
        assert path.stat().st_size < 0.6 * RunFolder(whole).checkpoint(step).stat().st_size
    # the newest is whole, and the run resumed from step 4 is bitwise the one trained straight through
    assert_bitwise_equal(_load(slim, 6), _load(whole, 6))
    assert [r["fid"] for r in read_jsonl(RunFolder(slim).eval_log)] == [r["fid"] for r in read_jsonl(
        RunFolder(whole).eval_log)]
    assert repair.damage(_run(), slim) is None


def test_under_keep_optimizer_all_every_checkpoint_stays_whole(runs):
    assert all("opt" in _load(runs["whole"], s) for s in (2, 4, 6))


def test_a_run_that_could_only_go_on_from_a_slim_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    rdir = tmp_path / "run"
    run_training(_run(), rdir, stop_at=4)   # checkpoints: 2 slim, 4 whole
    two, four = RunFolder(rdir).checkpoint(2), RunFolder(rdir).checkpoint(4)
    four.write_bytes(four.read_bytes()[:1000])   # the only whole one is lost (truncated)
    kept = two.read_bytes()
    assert cli.main(["train", "--run-dir", str(rdir)]) == 2
    err = capsys.readouterr().err   # (and the latent cache's progress bar)
    assert err.count("error:") == 1 and "Traceback" not in err and err.endswith(" and export.\n")
    assert err.splitlines()[-1].startswith(
        f"error: {two}: the newest valid checkpoint is slim (train.keep_optimizer: newest dropped its optimizer "
        "state), so training cannot resume exactly from step 2. Fix: put back a whole checkpoint of a later step "
        "(invalid ones were renamed *.corrupt)")
    assert two.read_bytes() == kept and (rdir / "checkpoints" / "step_0000004.pt.corrupt").exists()
    assert [r["step"] for r in read_jsonl(RunFolder(rdir).train_log)] == [1, 2, 3, 4]   # nothing trained
    # a run whose newest valid checkpoint is slim but that has no steps to go is not refused
    run_training(tiny_run(steps=2, keep_last=1, at_steps=[2], eval=EVAL), rdir)
    assert (rdir / "done").exists() and two.read_bytes() == kept


def test_readers_of_weights_and_ema_take_a_slim_checkpoint(runs, tmp_path, capsys):
    path, want = RunFolder(runs["slim"]).checkpoint(2), _load(runs["whole"], 2)
    for use_ema, key in ((True, "ema"), (False, "model")):   # harness sample, export (--raw), interop
        model, run, state = model_from_checkpoint(path, use_ema=use_ema)
        assert "opt" not in state and run.model == _run().model
        assert _same(model.state_dict(), want[key])
    assert _same(read_source(path).state_dict, want["ema"])   # train.init_from, harness import
    out = tmp_path / "samples"
    assert cli.main(["sample", "--checkpoint", str(path), "--num-samples", "2", "--steps", "2", "--batch-size", "2",
                     "--compile", "off", "--out", str(out)]) == 0
    assert "(step 2, EMA weights" in capsys.readouterr().out and (out / "samples.npz").exists()
    exported = read_source(export_diffusers(path, tmp_path / "pipe"))
    assert _same({k: v for k, v in exported.state_dict.items() if k != "pos_embed"},
                 {k: v for k, v in want["ema"].items() if k != "pos_embed"})


def test_a_checkpoints_from_run_evaluates_slim_checkpoints_it_staged_and_rewrites_none(runs, tmp_path):
    for source in ("slim", "whole"):   # the whole run's step 2 is no newest in the staged folder either
        run = _run()
        run.sweep, run.checkpoints_from = "evalonly", "test"
        run.eval.at_steps, run.eval.sampling_steps = [2, 4], [3]
        rdir = tmp_path / source
        SweepJob()(run.to_dict(), str(rdir), str(runs[source]))
        for step in (2, 4):   # linked, not rewritten (that would take disk, not free it)
            assert os.path.samefile(RunFolder(rdir).checkpoint(step), RunFolder(runs[source]).checkpoint(step))
        assert [(r["step"], r["sampling_steps"]) for r in read_jsonl(RunFolder(rdir).eval_log)] == [(2, 3), (4, 3)]
        assert not RunFolder(rdir).train_log.exists() and (rdir / "done").exists()


def test_a_run_of_the_old_setting_goes_on_under_the_new_one(runs, tmp_path):
    """A folder that keep_optimizer all left, resumed under newest: its older steps are slimmed as it resumes
    (here there is nothing else to do, the run is done); from there it is refused, with steps to go."""
    rdir = tmp_path / "run"
    shutil.copytree(runs["whole"], rdir)
    run_training(_run(), rdir)
    assert ["opt" in _load(rdir, s) for s in (2, 4, 6)] == [False, False, True]
    (rdir / "checkpoints" / "step_0000006.pt").unlink()
    with pytest.raises(HarnessError, match=r"step_0000004.pt: the newest valid checkpoint is slim"):
        run_training(_run(), rdir)


def _two_free_ports() -> tuple[int, int]:
    """Two distinct TCP ports free on localhost now (both held while chosen)."""
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return a.getsockname()[1], b.getsockname()[1]


def _rank(rank: int, world: int, port: int, second_port: int, run_dir: str) -> None:
    """One of two training processes: to step 4 (rank 0 slims step 2 as both evaluate step 4), then, step 4's
    checkpoint gone, again; each rank writes its refusal down (each must refuse: none may wait for the other)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    as_rank(rank, world, port)
    run_training(_run(), Path(run_dir), stop_at=4)
    if rank == 0:   # before it joins the second run, which rank 1 cannot start without it
        RunFolder(Path(run_dir)).checkpoint(4).unlink()
    os.environ["MASTER_PORT"] = str(second_port)   # a process group of its own
    try:
        run_training(_run(), Path(run_dir))
    except HarnessError as err:
        (Path(run_dir) / f"refused.{rank}").write_text(str(err))


@pytest.mark.slow
def test_two_ranks_slim_while_they_evaluate_and_refuse_together(tmp_path):
    rdir = tmp_path / "run"
    mp.spawn(_rank, args=(2, *_two_free_ports(), str(rdir)), nprocs=2, join=True)
    assert "opt" not in _load(rdir, 2) and verify_checkpoint(RunFolder(rdir).checkpoint(2)) is None
    assert [r["step"] for r in read_jsonl(RunFolder(rdir).eval_log)] == [2, 4]
    refusals = [(rdir / f"refused.{r}").read_text() for r in (0, 1)]
    assert all(r.startswith(f"{RunFolder(rdir).checkpoint(2)}: the newest valid checkpoint is slim") for r in refusals)
