"""Atomic writes and append-only records."""
import json
import os
import stat

from harness.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl


def test_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / "eval.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a") as f:  # a crash in the middle of an append
        f.write('{"step": 2, "fi')
    append_jsonl(path, {"step": 3})
    assert [r["step"] for r in read_jsonl(path)] == [1, 3]
    # the torn fragment is gone, not just skipped by readers: every line of the file is a record
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 3]


def test_torn_line_longer_than_a_block_and_a_torn_first_line_are_repaired(tmp_path):
    path = tmp_path / "train.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "pad": "' + "x" * 10000)
    append_jsonl(path, {"step": 3})
    assert path.read_text() == '{"step": 1}\n{"step": 3}\n'
    only = tmp_path / "eval.jsonl"
    only.write_text('{"step": 1, "fid"')  # torn before any line was complete
    append_jsonl(only, {"step": 2})
    assert only.read_text() == '{"step": 2}\n'


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def _hold(lock, log, ready):
    import time

    from harness.io import file_lock

    with file_lock(lock):
        ready.set()
        with open(log, "a") as f:
            f.write("A-start\n")
        time.sleep(0.5)
        with open(log, "a") as f:
            f.write("A-end\n")


def test_file_lock_makes_a_second_process_wait(tmp_path):
    import multiprocessing as mp

    from harness.io import file_lock

    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path / ".run.lock", tmp_path / "log", ready))
    holder.start()
    assert ready.wait(60)
    with file_lock(tmp_path / ".run.lock"):
        with open(tmp_path / "log", "a") as f:
            f.write("B\n")
    holder.join(60)
    assert (tmp_path / "log").read_text().split() == ["A-start", "A-end", "B"]


def test_atomic_write_respects_the_umask(tmp_path):
    """Not the temp file's 0600: 0666 less the umask, like any file the user writes."""
    old = os.umask(0o022)
    try:
        assert stat.S_IMODE(atomic_write_text(tmp_path / "a.txt", "x").stat().st_mode) == 0o644
        os.umask(0o027)
        assert stat.S_IMODE(atomic_write_text(tmp_path / "b.txt", "x").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_remove_after_makes_the_record_durable_before_it_removes_anything(tmp_path, monkeypatch, caplog):
    import harness.io as io
    from pathlib import Path

    record, old = tmp_path / "eval.jsonl", [tmp_path / "a.npz", tmp_path / "b.npz"]
    append_jsonl(record, {"step": 4})
    for p in old:
        p.write_bytes(b"x")
    events = []
    real_fsync, real_unlink = os.fsync, Path.unlink
    monkeypatch.setattr(io.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(Path, "unlink", lambda self, **kw: events.append(("unlink", str(self))) or real_unlink(self, **kw))
    assert io.remove_after(record, old, "why") == old
    assert events[:2] == [("fsync", str(record)), ("fsync", str(tmp_path))]   # the record, then its folder
    assert events[2:4] == [("unlink", str(p)) for p in old] and not any(p.exists() for p in old)
    assert events[4:] == [("fsync", str(tmp_path))]

    # a record that cannot be made durable removes nothing; a file that cannot go is logged and kept
    keep = tmp_path / "c.npz"
    keep.write_bytes(b"x")
    assert io.remove_after(tmp_path / "missing.jsonl", [keep], "eval.keep_samples: none") == [] and keep.exists()
    stuck = tmp_path / "stuck.npz"
    stuck.mkdir()   # unlink fails on a folder
    assert io.remove_after(record, [stuck, keep], "eval.keep_samples: none") == [keep] and stuck.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "missing.jsonl" in warnings[0] and "eval.keep_samples: none" in warnings[0]
    assert warnings[1].startswith(f"{stuck}: kept, could not remove it") and "eval.keep_samples: none" in warnings[1]
