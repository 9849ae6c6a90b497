"""eval.keep_samples: which evaluation npz files a run keeps (all, last, none), on real tiny runs: the files
each value promises, the same records whatever the value, a kill between a record and a deletion, and
what `harness evaluate` says about a file that was not kept; one npz per setting (its digest in the name), and
the names runs evaluated before the digest left (legacy) still pruned and read."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.config.layout import RunFolder, features_name, samples_name
from harness.io import append_jsonl, read_jsonl
from harness.metrics import get_feature_extractor
from harness.training import evaluator as ev_mod
from harness.training.evaluation import eval_progress, eval_settings, unkept_samples
from harness.training.train import run_training
from train_tiny import tiny_run

ROOT = Path(__file__).resolve().parents[1]
KEEPS = ("all", "last", "none")
#: two steps x two settings; lr 1e-2, so that four steps make guidance (and the two settings) differ
TRAIN = {"steps": 4, "lr": 1e-2, "at_steps": [2, 4]}
EVAL = {"num_samples": 20, "sampling_steps": [2], "cfg_scales": [1.0, 4.0], "batch_size": 20}
#: what a record holds that depends on the clock
CLOCK = ("wall_s", "time")


def _run(keep: str):
    return tiny_run(**TRAIN, eval={**EVAL, "keep_samples": keep})


def _npz(run_dir: Path) -> list[str]:
    return sorted(p.name for p in RunFolder(run_dir).samples.glob("*.npz"))


def _setting(step: int, cfg: float, **ev) -> dict:
    """The setting these runs record at `step` and cfg scale `cfg` (eval_settings, the product's own)."""
    return eval_settings(tiny_run(**TRAIN, eval={**EVAL, **ev, "cfg_scales": [cfg]}), step)[0]


def _names(*steps: int, cfgs=(1.0, 4.0)) -> list[str]:
    return sorted(samples_name(_setting(s, c)) for s in steps for c in cfgs)


def _to_legacy(run_dir: Path) -> list[str]:
    """Rename each record's npz present to the name a run evaluated before the setting digest gave it (the same
    bytes: the digest changes no sample); the run's npz names, sorted."""
    folder = RunFolder(run_dir)
    for r in read_jsonl(folder.eval_log):
        if folder.samples_npz(r).exists():
            legacy = f"samples_step_{r['step']:07d}_k{r['sampling_steps']}_cfg{r['cfg_scale']:g}.npz"
            folder.samples_npz(r).rename(folder.samples / legacy)
    return _npz(run_dir)


def _records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in read_jsonl(RunFolder(run_dir).eval_log)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each value's run trained to step 2 (evaluated), then to step 4: {keep: (folder, npz files at step 2,
    npz paths NpzWriter was opened on)}."""
    root, out, real = tmp_path_factory.mktemp("keep"), {}, ev_mod.NpzWriter
    for keep in KEEPS:
        opened = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ev_mod, "NpzWriter", lambda path, *a, opened=opened: opened.append(Path(path).name) or real(path, *a))
            run_training(_run(keep), root / keep, stop_at=2)
            at_two = _npz(root / keep)
            run_training(_run(keep), root / keep)
        out[keep] = (root / keep, at_two, sorted(opened))
    return out


def test_each_value_leaves_exactly_the_files_it_promises(trained):
    assert trained["all"][1:] == (_names(2), _names(2, 4))
    assert _npz(trained["all"][0]) == _names(2, 4)
    # last: step 2's files while it is the last step evaluated, then step 4's only
    assert trained["last"][1:] == (_names(2), _names(2, 4))
    assert _npz(trained["last"][0]) == _names(4)
    # none: the npz is never even opened
    assert trained["none"][1:] == ([], [])
    assert _npz(trained["none"][0]) == []
    for keep in KEEPS:
        folder = trained[keep][0]
        assert not [p.name for p in RunFolder(folder).samples.iterdir() if p.name.startswith(".")]  # no temp files
        # what status and the report read is there whatever the value: the records and the grids
        assert eval_progress(_run(keep), folder) == (4, 4) and (folder / "done").exists()
        assert sorted(p.name for p in RunFolder(folder).samples.glob("*.png")) == [
            "grid_step_0000002.png", "grid_step_0000004.png"]


def test_the_records_are_the_same_whatever_the_value(trained):
    records = {keep: _records(trained[keep][0]) for keep in KEEPS}
    assert len(records["all"]) == 4 and all(r["fid"] > 0 and r["fid_se"] > 0 for r in records["all"])
    assert len({r["fid"] for r in records["all"]}) == 4   # four measurements, not one repeated
    assert records["last"] == records["all"] and records["none"] == records["all"]   # bitwise: == on floats
    for a, b in zip(*(sorted(RunFolder(trained[k][0]).samples.glob("samples_step_0000004_*.npz")) for k in ("all", "last"))):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


KILLED = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from pathlib import Path
from harness.training import evaluation
from harness.training.train import run_training
from train_tiny import tiny_run
real = evaluation.remove_after
def kill_first(record, paths, reason):
    if paths:  # step 4's first record is appended and durable; step 2's files are about to go
        os.kill(os.getpid(), signal.SIGKILL)
    return real(record, paths, reason)
evaluation.remove_after = kill_first
run_training(tiny_run(**{train!r}, eval={eval!r}), Path(sys.argv[1]))
"""


@pytest.mark.slow  # a subprocess trains and is killed (about 10 s on 2 cores)
def test_a_kill_between_the_record_and_the_deletion_loses_nothing_and_the_restart_cleans_up(trained, tmp_path):
    script, run_dir = tmp_path / "job.py", tmp_path / "run"
    script.write_text(KILLED.format(tests=str(ROOT / "tests"), train=TRAIN, eval={**EVAL, "keep_samples": "last"}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script), str(run_dir)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    # killed after step 4's first record, before step 2's files went: an extra file at worst, no gap
    assert [(r["step"], r["cfg_scale"]) for r in _records(run_dir)] == [(2, 1.0), (2, 4.0), (4, 1.0)]
    assert _npz(run_dir) == sorted(_names(2) + _names(4, cfgs=(1.0,)))
    run_training(_run("last"), run_dir)   # the restart: removes step 2's files, evaluates the setting owed
    assert _npz(run_dir) == _names(4) and (run_dir / "done").exists()
    assert _records(run_dir) == _records(trained["last"][0])
    for name in _names(4):
        assert (run_dir / "samples" / name).read_bytes() == (trained["last"][0] / "samples" / name).read_bytes()


def test_a_value_changed_to_none_removes_the_recorded_files_at_the_restart(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained["all"][0], run_dir)
    orphan = RunFolder(run_dir).samples_npz(_setting(4, 3.0))   # as if killed between the npz and its record
    shutil.copy(RunFolder(run_dir).samples_npz(_setting(4, 4.0)), orphan)
    before = _records(run_dir)
    run_training(_run("none"), run_dir)   # done: the restart only settles what is owed, here the files
    assert _npz(run_dir) == [orphan.name] and _records(run_dir) == before


def test_a_restart_removes_the_partial_npz_of_a_killed_evaluation(trained, tmp_path):
    """A setting's npz is written afresh by its evaluation, so what a kill left half-written is never needed."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained["all"][0], run_dir)
    samples = RunFolder(run_dir).samples
    partial = samples / f".{samples_name(_setting(4, 3.0))}.k1l2ed.tmp"
    partial.write_bytes(b"half an npz")
    other = samples / ".grid_step_0000004.png.k1l2ed.tmp"   # not an npz: not this cleaner's business
    other.write_bytes(b"x")
    run_training(_run("all"), run_dir)
    assert not partial.exists() and other.exists() and _npz(run_dir) == _names(2, 4)


def test_last_never_keeps_a_step_evaluated_after_a_later_one(trained, tmp_path):
    """A setting added later is evaluated from the retained checkpoint of step 2 after step 4 is recorded:
    step 2 is not the last step, so its npz is not even written; step 4's new setting is."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained["last"][0], run_dir)
    run = _run("last")
    run.eval.cfg_scales = [1.0, 4.0, 3.0]
    opened = []
    real = ev_mod.NpzWriter
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev_mod, "NpzWriter", lambda path, *a: opened.append(Path(path).name) or real(path, *a))
        run_training(run, run_dir)
    assert opened == _names(4, cfgs=(3.0,))
    assert _npz(run_dir) == _names(4, cfgs=(1.0, 4.0, 3.0))
    assert sorted((r["step"], r["cfg_scale"]) for r in _records(run_dir)) == [
        (s, c) for s in (2, 4) for c in (1.0, 3.0, 4.0)]


def test_only_files_whose_own_record_exists_are_removed(tmp_path):
    folder = RunFolder(tmp_path)
    folder.samples.mkdir()
    npz = {(step, cfg): folder.samples_npz(_setting(step, cfg)) for step in (2, 4) for cfg in (1.0, 2.0)}
    for path in npz.values():
        path.write_bytes(b"npz")
    for step, cfg in ((2, 1.0), (4, 1.0)):   # the cfg 2 records are missing (killed before them)
        append_jsonl(folder.eval_log, {**_setting(step, cfg), "fid": 1.0})
    assert unkept_samples(_run("all"), tmp_path) == []
    assert unkept_samples(_run("last"), tmp_path) == [npz[2, 1.0]]
    assert unkept_samples(_run("none"), tmp_path) == [npz[2, 1.0], npz[4, 1.0]]


def test_a_legacy_name_is_the_file_of_the_record_of_its_step_and_sampling_without_a_file_of_its_own(tmp_path):
    """A legacy npz (no digest) held the last setting of its step, sampling steps and cfg scale sampled before
    the digest: a record of those three whose own file is absent. A record with its own file was sampled after."""
    folder = RunFolder(tmp_path)
    folder.samples.mkdir()
    old, new = _setting(2, 1.0), _setting(2, 1.0, num_samples=10)   # one step and sampling, two settings
    records = [{**s, "fid": 1.0} for s in (old, new, _setting(4, 1.0), _setting(4, 4.0))]
    for r in records:
        append_jsonl(folder.eval_log, r)
    legacy = {n: folder.samples / f"samples_step_{n}.npz" for n in ("0000002_k2_cfg1", "0000002_k2_cfg4",
                                                                     "0000004_k2_cfg1", "0000004_k2_cfg4")}
    own = [folder.samples_npz(new), folder.samples_npz(records[3])]   # sampled after the digest
    for path in (*legacy.values(), *own):
        path.write_bytes(b"npz")
    owners = folder.samples_owners(records)
    assert owners[legacy["0000002_k2_cfg1"].name] == records[0] and owners[own[0].name] == records[1]
    assert owners[legacy["0000004_k2_cfg1"].name] == records[2] and owners[own[1].name] == records[3]
    # step 2 at cfg 4: no record; step 4 at cfg 4: its record has its own file, so this one is nobody's
    assert legacy["0000002_k2_cfg4"].name not in owners and legacy["0000004_k2_cfg4"].name not in owners
    assert sorted(unkept_samples(_run("last"), tmp_path)) == sorted([legacy["0000002_k2_cfg1"], own[0]])
    assert sorted(unkept_samples(_run("none"), tmp_path)) == sorted(
        [legacy["0000002_k2_cfg1"], own[0], legacy["0000004_k2_cfg1"], own[1]])


def test_features_names_are_those_of_before_the_samples_digest():
    """Recorded fid_features name existing files: the digest, now the samples' too, is the same as before it."""
    setting = {"step": 4, "num_samples": 20, "sampling_steps": 2, "sampler": "ddim", "cfg_scale": 4.0,
               "guidance_channels": 3, "feature_space": "digits", "reference": "digits"}
    assert _setting(4, 4.0) == setting   # what these runs record
    assert features_name(setting) == "fid_step_0000004_k2_cfg4_bdfaac7f.npy"   # computed before the change
    assert samples_name(setting) == "samples_step_0000004_k2_cfg4_bdfaac7f.npz"
    imagenet = {"step": 400000, "num_samples": 50000, "sampling_steps": 250, "sampler": "ddpm", "cfg_scale": 1.5,
                "guidance_channels": 4, "feature_space": "inception",
                "reference": "/data/VIRTUAL_imagenet256_labeled.npz"}
    assert features_name(imagenet) == "fid_step_0400000_k250_cfg1.5_3945b41f.npy"
    # a record names the same files as its setting: measurements are no part of the digest
    record = {**setting, "fid": 7.0, "fid_features": features_name(setting), "time": 1.8e9}
    assert (features_name(record), samples_name(record)) == (features_name(setting), samples_name(setting))


def test_a_rerun_with_another_num_samples_keeps_both_settings_npz(trained, tmp_path):
    """eval.num_samples changed and the run resumed: the new settings' npz are written beside the old ones,
    which stay byte for byte, and each file holds the samples of its own record (its FID features)."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained["all"][0], run_dir)
    folder = RunFolder(run_dir)
    before = {p.name: p.read_bytes() for p in folder.samples.glob("*.npz")}
    run_training(tiny_run(**TRAIN, eval={**EVAL, "keep_samples": "all", "num_samples": 10}), run_dir)
    records = list(read_jsonl(folder.eval_log))
    assert [r["num_samples"] for r in records] == [20] * 4 + [10] * 4
    assert _npz(run_dir) == sorted(samples_name(r) for r in records) and len(set(_npz(run_dir))) == 8
    assert {n: (folder.samples / n).read_bytes() for n in before} == before
    extractor = get_feature_extractor("digits")
    for r in records:
        with np.load(folder.samples_npz(r)) as f:
            images = f["arr_0"]
        assert len(images) == r["num_samples"]
        stored = np.load(folder.features_file(r["fid_features"]), allow_pickle=False)
        np.testing.assert_allclose(extractor.extract(images, 20).pool, stored, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", ["last", "none"])
def test_legacy_named_npz_are_pruned_as_their_records_say(trained, tmp_path, keep):
    """A run evaluated before the digest, resumed under keep_samples last or none: its legacy files go as new
    ones would (`last` keeps the highest step's)."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained["all"][0], run_dir)
    legacy = _to_legacy(run_dir)
    assert legacy == ["samples_step_0000002_k2_cfg1.npz", "samples_step_0000002_k2_cfg4.npz",
                      "samples_step_0000004_k2_cfg1.npz", "samples_step_0000004_k2_cfg4.npz"]
    run_training(_run(keep), run_dir)
    assert _npz(run_dir) == (legacy[2:] if keep == "last" else [])


def test_harness_evaluate_names_keep_samples_for_a_file_not_kept(trained, capsys):
    from harness.cli import main
    from harness.metrics.evaluate import load_samples

    def evaluate(path: Path) -> tuple[int, str]:
        rc = main(["evaluate", "--samples", str(path), "--reference", "digits", "--features", "digits"])
        return rc, capsys.readouterr().err.strip()

    for keep, step in (("last", 2), ("none", 4)):
        folder = RunFolder(trained[keep][0])
        path = folder.samples_npz(_setting(step, 4.0))
        rc, err = evaluate(path)
        assert rc == 2 and "\n" not in err, err
        assert f"{path} (--samples) was not kept" in err and f"eval.keep_samples: {keep}" in err
        assert str(folder.eval_log) in err and "eval.keep_samples: all" in err
        assert (f"harness sample --checkpoint {folder.checkpoint(step)} --steps 2 --cfg-scale 4 "
                "--guidance-channels 3 --sampler ddim --num-samples 20 --out DIR") in err
    assert load_samples(RunFolder(trained["last"][0]).samples_npz(_setting(4, 4.0))).shape == (20, 8, 8, 3)
    for keep in ("all", "last"):   # never evaluated, so never written: the file does not exist, whatever the value
        rc, err = evaluate(RunFolder(trained[keep][0]).samples_npz(_setting(6, 1.0)))
        assert rc == 2 and "does not exist" in err and "keep_samples" not in err


def test_harness_evaluate_reads_a_legacy_named_npz_and_names_keep_samples_for_one_pruned(trained, tmp_path, capsys):
    """A run evaluated under keep_samples: last before the digest: step 4's legacy files, none of step 2's."""
    from harness.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(trained["last"][0], run_dir)
    assert _to_legacy(run_dir) == ["samples_step_0000004_k2_cfg1.npz", "samples_step_0000004_k2_cfg4.npz"]
    argv = ["evaluate", "--reference", "digits", "--features", "digits", "--metrics", "fid", "--samples"]
    assert main([*argv, str(run_dir / "samples" / "samples_step_0000004_k2_cfg4.npz")]) == 0
    assert "samples        20" in capsys.readouterr().out
    pruned = run_dir / "samples" / "samples_step_0000002_k2_cfg4.npz"
    assert main([*argv, str(pruned)]) == 2
    err = capsys.readouterr().err
    assert f"{pruned} (--samples) was not kept" in err and "eval.keep_samples: last" in err
    assert f"harness sample --checkpoint {RunFolder(run_dir).checkpoint(2)} --steps 2 --cfg-scale 4 " in err
