"""Atomic writes and append-only records."""
import json

from harness.io import append_jsonl, atomic_write_json, read_jsonl


def test_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / "eval.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a") as f:  # a crash in the middle of an append
        f.write('{"step": 2, "fi')
    append_jsonl(path, {"step": 3})
    assert [r["step"] for r in read_jsonl(path)] == [1, 3]


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
