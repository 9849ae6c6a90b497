"""Checkpoint files: atomic save, checksum validation, newest-valid discovery, retention."""
from __future__ import annotations

import errno
import hashlib

import pytest
import torch

from harness.io import sha256_file
from harness.models import checkpoint as ckpt
from harness.errors import HarnessError


def _disk_full(path, write, mode):
    """Stands in for harness.io.atomic_write on a full file system."""
    raise OSError(errno.ENOSPC, "No space left on device")


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((64, 64), float(step))}, "step": step, "data_pos": step * 4}


def test_save_and_load_roundtrip_is_a_plain_torch_file(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 5, _state(5))
    assert path.name == "step_0000005.pt"
    assert ckpt.verify_checkpoint(path) is None
    plain = torch.load(path, weights_only=True)  # the sampler can read it without this module
    assert torch.equal(plain["model"]["w"], torch.full((64, 64), 5.0))
    assert ckpt.load_checkpoint(path)["step"] == 5


def test_truncated_newest_falls_back_to_previous(tmp_path, caplog):
    for s in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, s, _state(s))
    newest = ckpt.checkpoint_path(tmp_path, 6)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    state, path = ckpt.load_latest_valid(tmp_path)
    assert state["step"] == 4 and path.name == "step_0000004.pt"
    assert "step_0000006.pt" in caplog.text and "checksum mismatch" in caplog.text
    assert (tmp_path / "step_0000006.pt.corrupt").exists()  # quarantined: not picked again
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4]


def test_flipped_byte_and_missing_sidecar_are_invalid(tmp_path):
    p2 = ckpt.save_checkpoint(tmp_path, 2, _state(2))
    p4 = ckpt.save_checkpoint(tmp_path, 4, _state(4))
    data = bytearray(p4.read_bytes())
    data[len(data) // 3] ^= 0xFF
    p4.write_bytes(bytes(data))
    assert "checksum" in ckpt.verify_checkpoint(p4)
    (tmp_path / "step_0000002.pt.sha256").unlink()  # killed between the rename and the sidecar
    assert "no checksum" in ckpt.verify_checkpoint(p2)
    assert ckpt.load_latest_valid(tmp_path) is None


def test_retention_keeps_last_k_and_eval_steps(tmp_path):
    for s in range(1, 8):
        ckpt.save_checkpoint(tmp_path, s, _state(s))
    deleted = ckpt.apply_retention(tmp_path, keep_last=2, keep_steps=[3])
    assert sorted(p.name for p in deleted) == [f"step_000000{s}.pt" for s in (1, 2, 4, 5)]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 6, 7]
    assert not (tmp_path / "step_0000001.pt.sha256").exists()


def test_partial_writes_are_cleaned(tmp_path):
    ckpt.save_checkpoint(tmp_path, 2, _state(2))
    (tmp_path / ".step_0000004.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert ckpt.clean_partial_writes(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert ckpt.load_latest_valid(tmp_path)[0]["step"] == 2


def test_rng_states_round_trip_through_a_checkpoint_and_the_pre_tensor_format_is_refused(tmp_path):
    """RNG states are tensors and plain values, so they round-trip through weights_only loading bitwise.
    For a few hours they were numpy's get_state() (an ndarray): such a checkpoint is no longer read (issue 22
    removed that loader); it is refused in one line like any file holding Python objects."""
    import random

    import numpy as np

    from harness.training.runtime import rng_state, set_rng_state

    np.random.seed(3)
    random.seed(3)
    now = rng_state()
    want = (np.random.rand(4), random.random(), torch.rand(3))
    set_rng_state(ckpt.load_checkpoint(ckpt.save_checkpoint(tmp_path, 4, {**_state(4), "rng": now}))["rng"])
    got = (np.random.rand(4), random.random(), torch.rand(3))
    assert np.array_equal(got[0], want[0]) and got[1] == want[1] and torch.equal(got[2], want[2])
    legacy = {"torch": torch.get_rng_state(), "cuda": None, "numpy": np.random.get_state(),
              "python": random.getstate()}
    path = ckpt.save_checkpoint(tmp_path, 2, {**_state(2), "rng": legacy})
    with pytest.raises(ValueError) as err:
        ckpt.load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: refused: it holds Python objects beyond tensors and plain values")
    assert "numpy" in str(err.value)


# ----------------------------------------------------------------------------- edges (issue 16's mutation survivors)
def test_sidecar_is_the_sha256_of_the_file_and_chunked_hashing_agrees(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 3, _state(3))
    digest, name = (tmp_path / "step_0000003.pt.sha256").read_text().split()
    assert name == path.name and digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path, chunk=1000) == digest  # many chunks, a short last one


def test_an_empty_sidecar_is_a_mismatch_not_a_crash(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 3, _state(3))
    (tmp_path / "step_0000003.pt.sha256").write_text("")
    assert "checksum mismatch" in ckpt.verify_checkpoint(path)


def test_a_failed_write_names_the_file_and_the_resume_point_and_leaves_no_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 2, _state(2))

    monkeypatch.setattr(ckpt, "atomic_write", _disk_full)
    with pytest.raises(HarnessError) as err:
        ckpt.save_checkpoint(tmp_path, 4, _state(4))
    msg = str(err.value)
    assert "step_0000004.pt" in msg and "No space left on device" in msg
    assert "step_0000002.pt stays the resume point" in msg and "free space" in msg
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    assert not (tmp_path / "step_0000004.pt.sha256").exists()
    with pytest.raises(HarnessError, match="no earlier checkpoint"):
        ckpt.save_checkpoint(tmp_path / "empty", 1, _state(1))
    monkeypatch.undo()
    ckpt.save_checkpoint(tmp_path, 6, _state(6))       # a later checkpoint is no resume point for step 4
    (tmp_path / "step_0000002.pt.sha256").unlink()     # and one without its sidecar is none either
    monkeypatch.setattr(ckpt, "atomic_write", _disk_full)
    with pytest.raises(HarnessError, match="no earlier checkpoint"):
        ckpt.save_checkpoint(tmp_path, 4, _state(4))


def test_slow_save_hook_applies_to_its_step_only(monkeypatch):
    monkeypatch.setenv(ckpt.SLOW_SAVE_ENV, "5:0.25")
    assert ckpt._slow_save_seconds(5) == 0.25 and ckpt._slow_save_seconds(6) == 0.0
    monkeypatch.setenv(ckpt.SLOW_SAVE_ENV, "5")
    assert ckpt._slow_save_seconds(5) == 0.0
    monkeypatch.delenv(ckpt.SLOW_SAVE_ENV)
    assert ckpt._slow_save_seconds(5) == 0.0


def test_slow_save_writes_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv(ckpt.SLOW_SAVE_ENV, "7:0.01")
    slow = ckpt.save_checkpoint(tmp_path / "a", 7, _state(7))
    monkeypatch.delenv(ckpt.SLOW_SAVE_ENV)
    fast = ckpt.save_checkpoint(tmp_path / "b", 7, _state(7))
    assert slow.read_bytes() == fast.read_bytes() and ckpt.verify_checkpoint(slow) is None


def test_listing_ignores_other_files_and_missing_folders(tmp_path):
    assert ckpt.list_checkpoints(tmp_path / "nowhere") == []
    ckpt.save_checkpoint(tmp_path, 12, _state(12))
    ckpt.save_checkpoint(tmp_path, 3, _state(3))
    (tmp_path / "step_0000009.pt").mkdir()          # a folder with a checkpoint's name
    (tmp_path / "notes.txt").write_text("x")
    assert [(s, p.name) for s, p in ckpt.list_checkpoints(tmp_path)] == [(3, "step_0000003.pt"),
                                                                         (12, "step_0000012.pt")]


def test_not_a_training_checkpoint_and_pickled_code_are_refused(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {"model": {}})       # no step
    with pytest.raises(ValueError, match="not a harness training checkpoint"):
        ckpt.load_checkpoint(path)
    evil = ckpt.save_checkpoint(tmp_path, 2, {"model": {}, "step": 2, "hook": print})
    with pytest.raises(ValueError, match="refused: it holds Python objects") as err:
        ckpt.load_checkpoint(evil)
    assert "builtins.print" in str(err.value)  # names what it refused


def test_newest_valid_without_quarantine_leaves_files_alone(tmp_path):
    assert ckpt.load_latest_valid(tmp_path / "nowhere") is None
    for s in (2, 4):
        ckpt.save_checkpoint(tmp_path, s, _state(s))
    newest = ckpt.checkpoint_path(tmp_path, 4)
    newest.write_bytes(newest.read_bytes()[:100])
    state, path = ckpt.load_latest_valid(tmp_path, quarantine=False)
    assert state["step"] == 2 and path.name == "step_0000002.pt"
    assert newest.exists() and (tmp_path / "step_0000004.pt.sha256").exists()
    ckpt.load_latest_valid(tmp_path)   # with quarantine: renamed, its sidecar gone
    assert not newest.exists() and not (tmp_path / "step_0000004.pt.sha256").exists()


def test_retention_edges(tmp_path):
    for s in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, s, _state(s))
    assert ckpt.apply_retention(tmp_path, keep_last=0) == []
    assert ckpt.apply_retention(tmp_path, keep_last=-1, keep_steps=[]) == []
    assert ckpt.apply_retention(tmp_path, keep_last=5) == []
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2, 3]
    deleted = ckpt.apply_retention(tmp_path, keep_last=1, keep_steps=("1",))
    assert [p.name for p in deleted] == ["step_0000002.pt"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 3]
    assert all(ckpt.verify_checkpoint(p) is None for _, p in ckpt.list_checkpoints(tmp_path))


def test_partial_write_cleaning_counts_only_temp_checkpoints(tmp_path):
    assert ckpt.clean_partial_writes(tmp_path / "nowhere") == 0
    assert ckpt.clean_partial_writes(tmp_path) == 0
    for name in (".step_0000004.pt.a.tmp", ".step_0000006.pt.b.tmp"):
        (tmp_path / name).write_bytes(b"half")
    (tmp_path / ".other.tmp").write_bytes(b"not ours")
    assert ckpt.clean_partial_writes(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp"]


# ----------------------------------------------------------------------------- what the training log says
# A run's log is the operator's only record of what happened to its checkpoints: each line is checked whole.
def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ckpt.__name__]


def test_saving_logs_the_path_and_size(tmp_path, caplog):
    caplog.set_level("INFO", logger=ckpt.__name__)
    path = ckpt.save_checkpoint(tmp_path, 3, {"model": {"w": torch.zeros(1024, 1024)}, "step": 3})
    assert _messages(caplog) == [f"saved checkpoint {path} (4.0 MB)"]   # 2**20 floats of 4 bytes, in MiB


def test_skipping_and_quarantine_are_logged(tmp_path, caplog, monkeypatch):
    for s in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, s, _state(s))
    (tmp_path / "step_0000006.pt.sha256").unlink()   # killed after the rename, before the sidecar
    four = ckpt.checkpoint_path(tmp_path, 4)
    four.write_bytes(four.read_bytes()[:100])
    caplog.set_level("INFO", logger=ckpt.__name__)

    def cannot_move(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(ckpt.os, "replace", cannot_move)
    assert ckpt.load_latest_valid(tmp_path)[1].name == "step_0000002.pt"
    six = ckpt.checkpoint_path(tmp_path, 6)
    assert _messages(caplog) == [
        f"skipping invalid checkpoint: {six}: no checksum file step_0000006.pt.sha256 (the save did not finish)",
        f"could not quarantine {six}: [Errno 13] Permission denied",
        f"skipping invalid checkpoint: {four}: " + ckpt.verify_checkpoint(four),
        f"could not quarantine {four}: [Errno 13] Permission denied"]
    monkeypatch.undo()
    caplog.clear()
    ckpt.load_latest_valid(tmp_path)   # moves both; the missing sidecar is no failure to log
    assert [m.split(":")[0] for m in _messages(caplog)] == ["skipping invalid checkpoint"] * 2
    assert (tmp_path / "step_0000006.pt.corrupt").exists() and (tmp_path / "step_0000004.pt.corrupt").exists()


def test_cleaning_and_retention_are_logged(tmp_path, caplog):
    for s in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, s, _state(s))
    (tmp_path / "step_0000001.pt.sha256").unlink()   # an old checkpoint whose save never finished
    (tmp_path / ".step_0000004.pt.a.tmp").write_bytes(b"half")
    caplog.set_level("INFO", logger=ckpt.__name__)
    assert ckpt.clean_partial_writes(tmp_path) == 1
    assert [p.name for p in ckpt.apply_retention(tmp_path, keep_last=1)] == ["step_0000001.pt", "step_0000002.pt"]
    assert _messages(caplog) == [f"removed 1 partial checkpoint write(s) in {tmp_path}",
                                 "retention removed step_0000001.pt, step_0000002.pt"]


# ----------------------------------------------------------------------------- the remaining edges
def test_a_failed_write_message_quotes_the_os_reason_and_a_failed_rewrite_keeps_that_step(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "atomic_write", _disk_full)
    with pytest.raises(HarnessError) as err:
        ckpt.save_checkpoint(tmp_path, 1, _state(1))
    assert "could not write the checkpoint (No space left on device); no earlier checkpoint. Fix:" in str(err.value)
    monkeypatch.undo()
    for s in (2, 4):
        ckpt.save_checkpoint(tmp_path, s, _state(s))
    monkeypatch.setattr(ckpt, "atomic_write", _disk_full)
    with pytest.raises(HarnessError, match="the checkpoint step_0000004.pt stays the resume point"):
        ckpt.save_checkpoint(tmp_path, 4, _state(4))   # the old file at step 4 is untouched, and whole
    assert ckpt.verify_checkpoint(ckpt.checkpoint_path(tmp_path, 4)) is None


def test_the_slow_save_hook_stalls_its_step_once_and_no_other(tmp_path, monkeypatch):
    stalls = []
    monkeypatch.setattr(ckpt.time, "sleep", stalls.append)
    monkeypatch.setenv(ckpt.SLOW_SAVE_ENV, "7:0.25")
    ckpt.save_checkpoint(tmp_path, 6, _state(6))
    assert stalls == []
    ckpt.save_checkpoint(tmp_path, 7, _state(7))
    assert stalls == [0.25]


def test_a_checksum_mismatch_quotes_twelve_hex_digits_of_each(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 3, _state(3))
    digest = (tmp_path / "step_0000003.pt.sha256").read_text().split()[0]
    (tmp_path / "step_0000003.pt.sha256").write_text(f"{'0' * 64}  {path.name}\n")
    assert ckpt.verify_checkpoint(path) == (f"checksum mismatch (file {digest[:12]}..., recorded 000000000000...): "
                                            "truncated or corrupt")
    (tmp_path / "step_0000003.pt.sha256").write_text("")
    assert "recorded ...)" in ckpt.verify_checkpoint(path)


def test_map_location_reaches_torch_load_on_every_path(tmp_path):
    """'meta' is a map_location whose effect shows: tensors come back without storage."""
    ckpt.save_checkpoint(tmp_path, 2, _state(2))
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 2), "meta")["model"]["w"].is_meta
    assert ckpt.load_latest_valid(tmp_path, "meta")[0]["model"]["w"].is_meta


def test_a_file_torch_cannot_read_is_refused_with_the_first_line_of_the_reason(tmp_path):
    path = tmp_path / "step_0000005.pt"
    path.write_bytes(b"not a zip archive at all")   # whole (its sidecar matches) but not a torch file
    ckpt.atomic_write_text(ckpt.sidecar_path(path), f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    with pytest.raises(ValueError) as err:
        ckpt.load_checkpoint(path)
    assert str(err.value) == f"{path}: torch.load failed: Expected input to be a checkpoint returned by torch.save"


def test_first_line_of_an_error():
    assert ckpt._first_line(ValueError("\n  the reason  \nmore detail")) == "the reason"
    assert ckpt._first_line(ValueError("one")) == "one"
    assert ckpt._first_line(KeyError()) == "KeyError"
    assert ckpt._first_line(ValueError(" \n ")) == "ValueError"


def test_every_refused_global_is_named(tmp_path):
    evil = ckpt.save_checkpoint(tmp_path, 2, {"model": {}, "step": 2, "hook": print, "size": len})
    with pytest.raises(ValueError) as err:
        ckpt.load_checkpoint(evil)
    found = torch.serialization.get_unsafe_globals_in_checkpoint(evil)
    assert len(found) >= 2 and f"({', '.join(found)})" in str(err.value)


# ----------------------------------------------------------------------------- slim checkpoints (train.keep_optimizer)
def _whole(step: int) -> dict:
    """A checkpoint's dict whose optimizer state is as large as its weights and EMA together, as AdamW's is."""
    w = torch.full((32, 32), float(step))
    return {"model": {"w": w}, "ema": {"w": w / 2}, "step": step, "data_pos": step * 4, "run": {"model": "x"},
            "opt": {"state": {0: {"exp_avg": w * 3, "exp_avg_sq": w * 4, "step": torch.tensor(float(step))}},
                    "param_groups": [{"lr": 1e-4, "params": [0]}]}}


def _sealed(path) -> bool:
    return ckpt.sidecar_path(path).exists() and ckpt.verify_checkpoint(path) is None


def test_slimming_drops_the_optimizer_state_only_and_rewrites_the_sidecar(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 4, _whole(4))
    size = path.stat().st_size
    assert ckpt.slim_checkpoint(path) is True
    assert _sealed(path) and path.stat().st_size < 0.6 * size
    slim, want = torch.load(path, weights_only=True), _whole(4)
    assert set(slim) == set(want) - {"opt"}
    assert torch.equal(slim["model"]["w"], want["model"]["w"]) and torch.equal(slim["ema"]["w"], want["ema"]["w"])
    assert (slim["step"], slim["data_pos"], slim["run"]) == (4, 16, {"model": "x"})
    assert ckpt.load_checkpoint(path)["step"] == 4
    before = path.read_bytes()
    assert ckpt.slim_checkpoint(path) is False and path.read_bytes() == before   # slim already: left alone
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_checkpoint_that_does_not_verify_is_not_slimmed(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 4, _whole(4))
    ckpt.sidecar_path(path).write_text(f"{'0' * 64}  {path.name}\n")   # a corrupt file must not get a fresh sidecar
    before = path.read_bytes()
    with pytest.raises(ValueError, match="step_0000004.pt: checksum mismatch"):
        ckpt.slim_checkpoint(path)
    assert path.read_bytes() == before and ckpt.sidecar_path(path).read_text().startswith("0" * 64)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="step_0000004.pt: torch.load failed"):
        ckpt.slim_checkpoint(path)


def test_a_slim_write_that_fails_after_the_sidecar_went_leaves_the_whole_checkpoint_sealed(tmp_path, monkeypatch,
                                                                                           caplog):
    path = ckpt.save_checkpoint(tmp_path, 2, _whole(2))
    ckpt.save_checkpoint(tmp_path, 4, _whole(4))
    before = path.read_bytes()

    def fsync_fails(target, write, mode):   # writes (which removes the old sidecar), then the fsync fails
        with open(tmp_path / "scratch", "wb") as f:
            write(f)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, "atomic_write", fsync_fails)
    caplog.set_level("WARNING", logger=ckpt.__name__)
    assert ckpt.slim_old_checkpoints(tmp_path, keep_last=1, keep_steps=[2, 4]) == []
    assert path.read_bytes() == before and _sealed(path)
    assert _messages(caplog) == ["kept step_0000002.pt as it is, not slimmed: [Errno 28] No space left on device"]


def test_retention_slims_the_evaluated_steps_beyond_the_newest_unless_keep_optimizer_is_all(tmp_path):
    for keep_optimizer in ("newest", "all"):
        folder = tmp_path / keep_optimizer
        for s in range(1, 6):
            ckpt.save_checkpoint(folder, s, _whole(s))
        deleted = ckpt.apply_retention(folder, keep_last=2, keep_steps=[1, 3, 5], keep_optimizer=keep_optimizer)
        assert [p.name for p in deleted] == ["step_0000002.pt"]
        found = ckpt.list_checkpoints(folder)
        assert [s for s, _ in found] == [1, 3, 4, 5] and all(_sealed(p) for _, p in found)
        has_opt = {s: "opt" in torch.load(p, weights_only=True) for s, p in found}
        slim = {1, 3} if keep_optimizer == "newest" else set()
        assert has_opt == {s: s not in slim for s in (1, 3, 4, 5)}, keep_optimizer
    assert ckpt.slim_old_checkpoints(tmp_path / "all", keep_last=0, keep_steps=[1, 3]) == []


def test_a_slimming_cut_short_is_sealed_and_finished_and_a_bad_unsealed_file_left_alone(tmp_path, caplog):
    for s in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, s, _whole(s))
    one, two = ckpt.checkpoint_path(tmp_path, 1), ckpt.checkpoint_path(tmp_path, 2)
    ckpt.sidecar_path(one).unlink()      # killed after the old sidecar went, before the slim copy was in place
    ckpt.sidecar_path(two).unlink()
    two.write_bytes(two.read_bytes()[:200])  # and one that is not whole (no slimming leaves that; repair's to judge)
    caplog.set_level("INFO", logger=ckpt.__name__)
    assert ckpt.slim_old_checkpoints(tmp_path, keep_last=2, keep_steps=[1, 2, 3]) == [one]
    assert _sealed(one) and "opt" not in torch.load(one, weights_only=True)
    assert not ckpt.sidecar_path(two).exists() and two.stat().st_size == 200
    messages = _messages(caplog)
    assert messages[0].startswith(f"{one} had no checksum file (a slimming cut short?); it loads whole")
    assert messages[1].startswith(f"kept step_0000002.pt as it is, not slimmed: {two}: no checksum file, and it "
                                  "does not load (")
    assert messages[2] == "dropped the optimizer state of step_0000001.pt (train.keep_optimizer: newest)"


def test_the_slow_slim_hook_stalls_its_step_at_its_point(tmp_path, monkeypatch):
    stalls = []
    monkeypatch.setattr(ckpt.time, "sleep", stalls.append)
    monkeypatch.setenv(ckpt.SLOW_SLIM_ENV, "2:replaced:0.5")
    for s in (1, 2):
        ckpt.slim_checkpoint(ckpt.save_checkpoint(tmp_path, s, _whole(s)))
    assert stalls == [0.5]
    monkeypatch.setenv(ckpt.SLOW_SLIM_ENV, "3:unsealed:0.25")
    ckpt.slim_checkpoint(ckpt.save_checkpoint(tmp_path, 3, _whole(3)))
    assert stalls == [0.5, 0.25]


def test_reverify_names_what_makes_an_unsealed_checkpoint_unusable(tmp_path):
    def reverify(step, state):
        path = ckpt.checkpoint_path(tmp_path, step)
        torch.save(state, path)
        return ckpt.reverify(path)

    assert reverify(1, _whole(1)) is None
    assert reverify(2, {k: v for k, v in _whole(2).items() if k != "opt"}) is None   # slim passes like whole
    assert reverify(3, {"model": {}, "step": 3}) == "not a harness training checkpoint"
    assert reverify(4, _whole(3)) == "holds step 3, not the step of its name"
    nan, inf = {"w": torch.tensor([1.0, float("nan")])}, {"w": torch.tensor([float("inf")])}
    assert reverify(5, {**_whole(5), "ema": nan}) == "its ema weights are not finite"
    assert reverify(6, {**_whole(6), "model": inf}) == "its model weights are not finite"
    ckpt.checkpoint_path(tmp_path, 7).write_bytes(b"half a file")
    assert ckpt.reverify(ckpt.checkpoint_path(tmp_path, 7)).startswith("does not load (")
