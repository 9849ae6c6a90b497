"""The ADM sample file: arr_0 uint8 (N, H, W, 3) images, arr_1 int64 (N,) labels, in an npz.

`NpzWriter` streams the images batch by batch into the file (uncompressed, as `np.savez` writes
it), so whoever writes 50,000 samples holds one batch at a time, not 9.8 GB; the file appears
under its name only when complete (`io.atomic_file`: a temporary file beside it, renamed). `save_npz` writes arrays
already in memory through the same writer, so the two give byte-identical files.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from harness.io import atomic_file

log = logging.getLogger(__name__)

#: a fixed zip member time, so equal samples give equal bytes (zip stores a modification time)
_EPOCH = (1980, 1, 1, 0, 0, 0)


def _member(zf: zipfile.ZipFile, name: str) -> Any:
    return zf.open(zipfile.ZipInfo(name, date_time=_EPOCH), "w", force_zip64=True)


def _header(fh: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
    d = np.lib.format.header_data_from_array_1_0(np.empty((0,) * len(shape), dtype))
    np.lib.format.write_array_header_1_0(fh, {**d, "shape": tuple(int(s) for s in shape)})


class _Aborted(Exception):
    """Thrown into the temp file's context to discard it."""


class NpzWriter:
    """Write `num` images of (height, width, 3) uint8 to `path` in order: `add(images, labels)` per
    batch, then `close()` (which checks the count and publishes the file through `io.atomic_file`). A
    writer closed short of `num`, or left by an error, leaves no file behind (and `path` as it was).
    Use as a context manager."""

    def __init__(self, path: str | Path, num: int, height: int, width: int):
        self.path, self.num, self.shape = Path(path), int(num), (int(num), int(height), int(width), 3)
        self._file = atomic_file(self.path)
        self.zf = zipfile.ZipFile(self._file.__enter__(), "w", zipfile.ZIP_STORED, allowZip64=True)
        self.fh = _member(self.zf, "arr_0.npy")
        _header(self.fh, self.shape, np.dtype(np.uint8))
        self.written = 0
        self.labels: list[np.ndarray] = []
        self.open = True

    def add(self, images: np.ndarray, labels: Any) -> None:
        images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64).reshape(-1)
        if images.dtype != np.uint8 or images.shape[1:] != self.shape[1:] or len(labels) != len(images):
            raise ValueError(f"ADM npz wants uint8 (N, {self.shape[1]}, {self.shape[2]}, 3) and N labels, got "
                             f"{images.dtype} {images.shape}, {labels.shape} labels")
        if self.written + len(images) > self.num:
            raise ValueError(f"{self.path}: {self.written + len(images)} images written, {self.num} declared")
        self.fh.write(np.ascontiguousarray(images).tobytes())
        self.labels.append(labels)
        self.written += len(images)

    def close(self) -> Path:
        if self.written != self.num:
            self.abort()
            raise ValueError(f"{self.path}: {self.written} images written, {self.num} declared")
        self.fh.close()
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64)
        with _member(self.zf, "arr_1.npy") as fh:
            _header(fh, labels.shape, labels.dtype)
            fh.write(labels.tobytes())
        self.zf.close()
        self.open = False
        self._file.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        if not self.open:
            return
        self.open = False
        for closing in (self.fh.close, self.zf.close):
            try:
                closing()
            except (OSError, ValueError):
                pass
        try:
            self._file.__exit__(_Aborted, _Aborted(), None)
        except _Aborted:
            pass

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None:
            self.abort()
        elif self.open:
            self.close()


def clean_partial_writes(folder: str | Path) -> int:
    """Remove the temp files of npz writes that were killed (`.NAME.npz.*.tmp`, `io.atomic_file`'s names): an
    evaluation starts a setting's file afresh, so a partial one is never resumed. Returns the count."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    partial = list(folder.glob(".*.npz.*.tmp"))
    for p in partial:
        p.unlink(missing_ok=True)
    if partial:
        log.info("removed %d partial npz write(s) in %s", len(partial), folder)
    return len(partial)


def save_npz(images: np.ndarray, labels: Any, path: str | Path) -> Path:
    """ADM layout, atomically: arr_0 uint8 (N, H, W, 3), arr_1 int64 (N,) labels."""
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(labels) != len(images):
        raise ValueError(f"ADM npz wants uint8 (N, H, W, 3) and N labels, got {images.dtype} {images.shape}, "
                         f"{labels.shape} labels")
    with NpzWriter(path, len(images), images.shape[1], images.shape[2]) as w:
        w.add(images, labels)
    return Path(path)
