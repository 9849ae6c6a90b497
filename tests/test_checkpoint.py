"""Checkpoint files: atomic save, checksum validation, newest-valid discovery, retention."""
from __future__ import annotations

import torch

from harness import checkpoint as ckpt


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


def test_checkpoint_from_before_tensor_rng_states_still_resumes(tmp_path):
    """RNG states used to be numpy's get_state() (an ndarray) and random.getstate(): such a checkpoint
    loads with exactly numpy's array types allow-listed, and its states restore bitwise."""
    import random

    import numpy as np

    from harness.runtime import rng_state, set_rng_state

    np.random.seed(3)
    random.seed(3)
    legacy = {"torch": torch.get_rng_state(), "cuda": None, "numpy": np.random.get_state(),
              "python": random.getstate()}
    want = (np.random.rand(4), random.random())
    path = ckpt.save_checkpoint(tmp_path, 2, {**_state(2), "rng": legacy})
    state = ckpt.load_checkpoint(path)
    np.random.seed(0)
    random.seed(0)
    set_rng_state(state["rng"])
    assert np.array_equal(np.random.rand(4), want[0]) and random.random() == want[1]
    # and the current format round-trips through a checkpoint too
    now = rng_state()
    want = (np.random.rand(4), random.random(), torch.rand(3))
    set_rng_state(ckpt.load_checkpoint(ckpt.save_checkpoint(tmp_path, 4, {**_state(4), "rng": now}))["rng"])
    got = (np.random.rand(4), random.random(), torch.rand(3))
    assert np.array_equal(got[0], want[0]) and got[1] == want[1] and torch.equal(got[2], want[2])
