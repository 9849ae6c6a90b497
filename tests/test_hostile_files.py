"""Hostile and broken files handed to the harness (issue 14): a checkpoint whose pickle would run
code, a disk that fills during a checkpoint write, truncated or corrupt npz and checkpoint files.
Each gets one line (exit 2, no traceback) and nothing runs, nothing is lost."""
from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.models import checkpoint as ckpt
from harness.errors import HarnessError
from train_tiny import tiny_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each test starts the console script or trains: seconds apiece


def harness_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_refusal(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # besides timestamped log lines (e.g. the digits feature network training on first use): one error line
    [line] = [x for x in proc.stderr.splitlines() if not x[:2].isdigit()]
    assert line.startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in line, line


class _Payload:
    """Unpickling this calls open(marker, "w"): it creates a file, the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_a_pickled_callable_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    path = ckpt.save_checkpoint(tmp_path / "checkpoints", 2, {
        "model": {"w": torch.zeros(2)}, "ema": {"w": torch.zeros(2)}, "step": 2,
        "run": {"model": "DiT-2x32x2/2"}, "extra": _Payload(marker)})
    assert ckpt.verify_checkpoint(path) is None  # the sidecar is valid: it proves wholeness, not origin
    proc = harness_cli("sample", "--checkpoint", str(path), "--out", str(tmp_path / "out"), "--num-samples", "1")
    assert_one_line_refusal(proc, str(path), "refused", "could run code")
    assert not marker.exists(), "the checkpoint's pickle ran code"
    with pytest.raises(ValueError, match="refused"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    # the payload is real: the unsafe loader would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_broken_checkpoint_given_to_sample_gets_one_line(tmp_path, damage):
    path = ckpt.save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(64)}, "step": 2, "run": {}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 10)
    assert_one_line_refusal(harness_cli("sample", "--checkpoint", str(path), "--out", str(tmp_path / "o")),
                            str(path), "checksum mismatch")
    path.with_name(path.name + ".sha256").unlink()  # no sidecar at all: still one line
    assert_one_line_refusal(harness_cli("sample", "--checkpoint", str(path), "--out", str(tmp_path / "o")),
                            str(path), "no checksum file")


@pytest.mark.parametrize("role", ["samples", "reference"])
@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage", "pickled"])
def test_broken_npz_given_to_evaluate_gets_one_line(tmp_path, damage, role):
    path = tmp_path / "samples.npz"
    np.savez(path, np.zeros((8, 8, 8, 3), np.uint8))
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped":
        data[len(data) // 2] ^= 0xFF
    elif damage == "garbage":
        data = bytearray(b"hello" * 40)
    else:
        np.savez(path, np.array([_Payload(tmp_path / "code-ran")], dtype=object))
        data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data))
    good = tmp_path / "good.npz"
    np.savez(good, np.zeros((8, 8, 8, 3), np.uint8))
    samples, reference = (str(path), "digits") if role == "samples" else (str(good), str(path))
    proc = harness_cli("evaluate", "--samples", samples, "--reference", reference, "--features", "digits")
    assert_one_line_refusal(proc, f"{'samples file' if role == 'samples' else 'reference'} {path}",
                            "not a readable npz")
    assert not (tmp_path / "code-ran").exists()


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_as_resume_point(tmp_path, monkeypatch, caplog):
    """ENOSPC halfway through writing step 4's checkpoint: one clear error naming step 2 as the resume
    point, no torn file or temporary left, and the next call resumes from step 2 and finishes."""
    import logging

    from harness.training.train import run_training

    real_write = ckpt.atomic_write

    def full_disk(path, write, mode="wb"):
        if Path(path).name != "step_0000004.pt":
            return real_write(path, write, mode)

        def half_then_enospc(f):
            f.write(b"x" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, half_then_enospc, mode)

    run = tiny_run(steps=6, ckpt_every=2)
    monkeypatch.setattr(ckpt, "atomic_write", full_disk)
    with pytest.raises(HarnessError) as err:
        run_training(run, tmp_path)
    msg = str(err.value)
    assert "No space left on device" in msg and "step_0000002.pt stays the resume point" in msg and "\n" not in msg
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000002.pt", "step_0000002.pt.sha256"], names
    monkeypatch.setattr(ckpt, "atomic_write", real_write)
    with caplog.at_level(logging.INFO, logger="harness.training.train"):
        run_training(run, tmp_path)
    assert "step_0000002.pt at step 2" in caplog.text  # resumed there
    assert (tmp_path / "done").exists() and ckpt.load_latest_valid(tmp_path / "checkpoints")[0]["step"] == 6
