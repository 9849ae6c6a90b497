"""Failed writes (issue 28, finding 3): ENOSPC, EDQUOT, EACCES, EROFS or a vanished folder on every write
path -- sweep state, run.json, JSON-lines records, npz, reports, caches -- is one line naming the file
and what to free or fix; the file is left as it was (never half-written), and the next run goes on."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import io
from harness.config import layout
from harness.errors import HarnessError
from harness.cost.plan import record_run
from train_tiny import tiny_run

ROOT = Path(__file__).resolve().parents[1]
ERRNOS = {errno.ENOSPC: "free space on that file system", errno.EDQUOT: "quota",
          errno.EACCES: "writable for you", errno.EROFS: "read-only", errno.ENOENT: "vanished"}


def _state(d: Path, n: int) -> Path:
    layout.save_state(d, {"runs": {"r": {"attempts": n}}})
    return d / layout.STATE_FILE


def _run_json(d: Path, n: int) -> Path:
    run = tiny_run(steps=4 + n)
    record_run(run, d)
    return layout.RunFolder(d).run_json


def _report(d: Path, n: int) -> Path:
    return io.atomic_write_text(d / "index.html", f"<p>{n}</p>")


def _npz(d: Path, n: int) -> Path:
    from harness.sampling.npz import save_npz

    return save_npz(np.full((2, 8, 8, 3), n, np.uint8), np.arange(2), d / "samples.npz")


def _flops_cache(d: Path, n: int) -> Path:
    from harness.models.flops import model_gflops

    model_gflops("DiT-2x32x2/2", "adaLN-Zero", 8, 1, 10 + n)  # a new key each time: the cache is rewritten
    return io.cache_dir("flops") / "flops.json"


def _jsonl(d: Path, n: int) -> Path:
    io.append_jsonl(d / "train.jsonl", {"step": n})
    return d / "train.jsonl"


PATHS = {"sweep state": _state, "run.json": _run_json, "report": _report, "npz": _npz,
         "flops cache": _flops_cache, "train.jsonl": _jsonl}


@pytest.mark.parametrize("code", sorted(ERRNOS), ids=errno.errorcode.get)
@pytest.mark.parametrize("what", sorted(PATHS))
def test_a_failed_write_is_one_line_and_leaves_the_file_as_it_was(tmp_path, monkeypatch, what, code):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))  # this test's own flops cache
    write = PATHS[what]
    path = write(tmp_path, 0)  # a first write that succeeds
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    # atomic writes fail at the rename (the temp file is complete), appends at the fsync (the line is written)
    with monkeypatch.context() as patch, pytest.raises(HarnessError) as info:
        patch.setattr(io.os, "fsync" if what == "train.jsonl" else "replace", fail)
        write(tmp_path, 1)
    msg = str(info.value)
    assert isinstance(info.value, OSError) and info.value.errno == code
    assert msg.startswith(f"{path}: could not write it ({os.strerror(code)}). Fix: ") and "\n" not in msg, msg
    assert ERRNOS[code] in msg and "run the same command again" in msg, msg
    assert path.read_bytes() == before, "the failed write changed the file"
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    write(tmp_path, 2)  # and the next write goes through
    assert path.read_bytes() != before


def test_a_read_only_results_folder_is_one_line_from_the_sweep_lock(tmp_path, monkeypatch):
    from harness.launch.dispatch import sweep_lock

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(HarnessError, match=r"\.sweep\.lock: could not write it \(Read-only file system\)\. Fix: that "
                                           r"file system is read-only"):
        with sweep_lock(tmp_path / "results" / "s"):
            pass


def test_a_write_error_survives_the_pickle_of_a_job_result():
    import pickle

    err = io.write_error("/r/train.jsonl", OSError(errno.ENOSPC, "No space left on device"))
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.errno == errno.ENOSPC and isinstance(back, HarnessError)


# a real, tiny file system: tmpfs in a private mount namespace (root or user namespaces needed)
TINY_FS = """
import errno, os, sys
from pathlib import Path
from harness import io
from harness.config import layout
from harness.errors import HarnessError
d = Path(sys.argv[1])
layout.save_state(d, {"runs": {}})
io.append_jsonl(d / "eval.jsonl", {"step": 1})
before = (d / "eval.jsonl").read_bytes(), (d / layout.STATE_FILE).read_bytes()
(d / "filler").write_bytes(b"x" * 200_000)  # the disk is now nearly full
for write in (lambda: layout.save_state(d, {"runs": {"r": {"reason": "y" * 100_000}}}),
              lambda: io.append_jsonl(d / "eval.jsonl", {"step": 2, "pad": "z" * 100_000})):
    try:
        write()
        sys.exit("a write to a full disk succeeded")
    except HarnessError as err:
        assert err.errno == errno.ENOSPC and "\\n" not in str(err), err
        print(err)
assert ((d / "eval.jsonl").read_bytes(), (d / layout.STATE_FILE).read_bytes()) == before
assert sorted(p.name for p in d.iterdir()) == sorted(["eval.jsonl", layout.STATE_FILE, "filler"])
(d / "filler").unlink()
io.append_jsonl(d / "eval.jsonl", {"step": 2})
assert [r["step"] for r in io.read_jsonl(d / "eval.jsonl")] == [1, 2]
print("ok")
"""


def test_a_real_full_file_system(tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user or mount namespaces here to mount a small tmpfs in")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    (tmp_path / "tiny_fs.py").write_text(TINY_FS)
    cmd = (f"mount -t tmpfs -o size=256k tmpfs {mnt} && "
           f"{sys.executable} {tmp_path / 'tiny_fs.py'} {mnt}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "ok" and len(lines) == 3
    assert all(": could not write it (No space left on device). Fix: free space" in x for x in lines[:2])


def test_a_job_that_met_a_full_disk_has_the_one_line_as_its_reason(tmp_path):
    """The job's traceback ends in "harness.io.WriteError: FILE: ..."; the run's reason is that line alone."""
    from types import SimpleNamespace

    from submitit.core.utils import cloudpickle_dump

    from harness.launch.status import job_reason

    err = io.write_error(tmp_path / "eval.jsonl", OSError(errno.ENOSPC, "No space left on device"))
    trace = f'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nharness.io.WriteError: {err}\n'
    cloudpickle_dump(("error", trace), tmp_path / "result.pkl")
    job = SimpleNamespace(paths=SimpleNamespace(result_pickle=tmp_path / "result.pkl"))
    assert job_reason(job, "FAILED") == f"FAILED: {err}"


@pytest.mark.slow
def test_a_sweep_whose_state_cannot_be_written_stops_in_one_line_and_the_rerun_finishes(tmp_path, monkeypatch,
                                                                                      capsys):
    from harness import cli
    from test_dispatch import tiny

    spec, results = tiny(tmp_path), tmp_path / "results"
    real_replace = os.replace

    def full_for_the_state(src, dst, *args, **kwargs):
        if Path(dst).name == layout.STATE_FILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(io.os, "replace", full_for_the_state)
        assert cli.main(["sweep", str(spec), "--launcher", "debug", "--results", str(results), "--no-report"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: {results / 'tiny' / layout.STATE_FILE}: could not write it (No space left")
    assert "Traceback" not in "\n".join(err) and not list((results / "tiny").glob(".*.tmp"))
    assert cli.main(["sweep", str(spec), "--launcher", "debug", "--results", str(results), "--no-report"]) == 0
    assert "1 done" in capsys.readouterr().out
