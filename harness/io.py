"""Atomic, durable file writes and append-only JSON-lines records."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from functools import lru_cache
from typing import Any, Callable, Iterator

from harness.errors import HarnessError

log = logging.getLogger(__name__)

# errno -> what to do about it; the rest get the generic fix
_FIXES = {
    errno.ENOSPC: "free space on that file system (`df -h {folder}`)",
    errno.EDQUOT: "free space within your quota on that file system (`quota -s`)",
    errno.EACCES: "make {folder} writable for you (`ls -ld {folder}`), or use another results folder",
    errno.EPERM: "make {folder} writable for you (`ls -ld {folder}`), or use another results folder",
    errno.EROFS: "that file system is read-only: use a results (or HARNESS_CACHE) folder on a writable one",
    errno.ENOENT: "its folder {folder} vanished (removed or unmounted): restore it",
}


class WriteError(HarnessError, OSError):
    """An OSError while writing a file of the harness, as one line naming the file and the fix.
    Still an OSError (errno, strerror), so callers that handle failed writes keep doing so."""

    def __init__(self, message: str, code: int | None = None, strerror: str | None = None):
        super().__init__(code, strerror)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:
        return type(self), (self.message, self.errno, self.strerror)


def write_error(path: str | Path, err: OSError) -> WriteError:
    """The one-line error for `err`, met writing `path`."""
    if isinstance(err, WriteError):
        return err
    path = Path(path)
    fix = _FIXES.get(err.errno, "check that {folder} exists and is writable").format(folder=path.parent)
    return WriteError(f"{path}: could not write it ({err.strerror or err}). Fix: {fix}, then run the same "
                      "command again (what was written before is kept; nothing was left half-written).",
                      err.errno, err.strerror)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OSError inside the block into the WriteError naming `path`."""
    try:
        yield
    except OSError as err:
        raise write_error(path, err) from err


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_durably(path: str | Path) -> None:
    """Remove `path` (if there) and fsync its folder, so the removal is on disk before whatever follows it."""
    path = Path(path)
    with writing(path):
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)


def _umask() -> int:
    """The process umask (read by setting it and putting it back: POSIX has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """`with atomic_file(path) as f: ...`: write into a temp file in the same folder; on leaving the block,
    fsync and rename it to `path` (on an error, remove it and leave `path` as it was).

    A reader never sees a half-written file; a crash leaves the old file (or none) in place. The
    file gets the mode any file the user writes gets (0666 less the umask), not the temp file's 0600.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide reports from the group
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write `path` through `write(fileobj)`, atomically (see atomic_file)."""
    with atomic_file(path, mode) as f:
        write(f)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _drop_torn_tail(f: Any, path: Path) -> None:
    """Cut a torn last line (a crash mid-append: no newline at the end) off the file `f` (open a+b).
    Complete lines always end in a newline, since each is one write; only the torn fragment goes."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return
    pos = end
    while pos > 0:  # back to the newline that ends the last complete line
        start = max(0, pos - 4096)
        f.seek(start)
        block = f.read(pos - start)
        nl = block.rfind(b"\n")
        if nl >= 0:
            pos = start + nl + 1
            break
        pos = start
    f.truncate(pos)
    log.warning("%s: removed a torn last line (%d bytes) left by an interrupted write", path, end - pos)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record as a single line (one write call, then fsync). Earlier lines are never
    rewritten; a torn last line (a crash mid-append) is removed first."""
    path = Path(path)
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:
            _drop_torn_tail(f, path)
            end = f.tell()
            try:
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            except OSError:  # a full disk mid-line: take the fragment back (else the next append does)
                with contextlib.suppress(OSError):
                    f.truncate(end)
                raise


def remove_after(record: str | Path, paths: list[Path], reason: str) -> list[Path]:
    """Delete `paths` only once `record` (the file that replaces them) is on disk for good: fsync it and its
    folder first, then unlink each path and fsync its folder. Housekeeping, never fatal: what cannot be
    removed is logged (with `reason`) and kept. Returns the paths removed."""
    if not paths:
        return []
    record = Path(record)
    try:
        with open(record, "rb") as f:
            os.fsync(f.fileno())
        _fsync_dir(record.parent)
    except OSError as err:
        log.warning("%s: could not make it durable (%s), so nothing it replaces is removed (%s)", record,
                    err.strerror or err, reason)
        return []
    removed = []
    for path in paths:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError as err:
            log.warning("%s: kept, could not remove it (%s; %s)", path, err.strerror or err, reason)
            continue
        removed.append(Path(path))
    for folder in {p.parent for p in removed}:
        with contextlib.suppress(OSError):
            _fsync_dir(folder)
    return removed


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield the records of a JSON-lines file; a torn last line (crash mid-append) is skipped."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed), waiting for it if another process has it."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s is held by another process; waiting for it", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_root() -> Path:
    """The harness's cache folder, not created: $HARNESS_CACHE, else ~/.cache/dit-harness."""
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "dit-harness")


def cache_dir(*parts: str) -> Path:
    """A folder of the harness's cache (`cache_root()`), created on use."""
    path = cache_root().joinpath(*parts)
    with writing(path / "."):
        path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- digests
def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, streamed in `chunk`-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=64)
def _path_digest_cached(path: str, size: int, mtime_ns: int) -> str:
    root = Path(path)
    if root.is_file():
        return sha256_file(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def path_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (a folder: of its files' names and bytes, in sorted order), cached per
    size and newest mtime, so hashing the same multi-GB weights again is free."""
    p = Path(path)
    st = p.stat()
    newest = max([st.st_mtime_ns] + ([f.stat().st_mtime_ns for f in p.rglob("*")] if p.is_dir() else []))
    return _path_digest_cached(str(p.resolve()), st.st_size, newest)


def npz_headers(path: str | Path) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{array name: (shape, dtype)} of an .npz from each member's header: a 50K-image batch is not loaded."""
    import zipfile

    import numpy as np  # not a harness import: only the readers of npz files pay for numpy

    out = {}
    with zipfile.ZipFile(path) as zf:
        for member in zf.namelist():
            if not member.endswith(".npy"):
                continue
            with zf.open(member) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            out[member[:-4]] = (tuple(shape), dtype)
    return out
