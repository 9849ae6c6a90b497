"""Reference statistics: the real-data side of every metric, computed once and cached.

A reference is one of
- 'digits': all 1,797 real digits (8x8, channels repeated to RGB);
- an npz in the ADM layout: `arr_0` (N, H, W, 3) uint8 images, and optionally ADM's precomputed
  Inception statistics `mu`, `sigma`, `mu_s`, `sigma_s` (e.g. VIRTUAL_imagenet256_labeled.npz),
  which are used as they are when the feature space is the official FID Inception;
- an image folder (any depth; ImageNet train layout works), centre-cropped ADM-style to `image_size`.

The cache (harness cache dir, `reference/`) is keyed by the dataset identity, its resolution and the
exact feature space (weights included). Pool features (for precision/recall) are kept too; for ADM
batches with precomputed statistics they are extracted from `arr_0` only when first needed.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from harness.data.datasets import IMAGE_EXTENSIONS, center_crop_arr, list_image_files, load_digits
from harness.errors import HarnessError
from harness.io import atomic_write, cache_dir, npz_headers
from harness.metrics.features import FeatureExtractor, Features, check_images
from harness.metrics.stats import gaussian_stats

log = logging.getLogger(__name__)

ADM_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclass
class ReferenceStats:
    """Gaussian statistics of the reference in one feature space, plus its pool features.

    mu (D,), sigma (D, D): pool features; mu_s (Ds,), sigma_s (Ds, Ds): spatial features.
    `pool_features()` -> (N, D) for precision/recall (computed on first use when not yet cached).
    """
    source: str
    identity: str
    feature_space: str
    feature_identity: str
    resolution: int
    num_images: int
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    _pool: np.ndarray | None = field(default=None, repr=False)
    _pool_loader: Callable[[], np.ndarray] | None = field(default=None, repr=False)

    def pool_features(self) -> np.ndarray:
        if self._pool is None:
            if self._pool_loader is None:
                raise HarnessError(f"reference {self.source} has no pool features for precision/recall; "
                                   "give an npz with arr_0 images or an image folder")
            self._pool = self._pool_loader()
        return self._pool


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _npz_identity(path: Path) -> str:
    """Cheap content identity of a (possibly multi-GB) file: name, size, first and last 4 MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
        if size > 8 << 20:
            f.seek(size - (4 << 20))
            h.update(f.read())
    return f"npz:{path.name}:{h.hexdigest()[:16]}"


def _npz_member_shape(path: Path, key: str) -> tuple[int, ...] | None:
    """Shape of one array in an npz, read from its header only (no multi-GB load)."""
    return npz_headers(path).get(key, (None, None))[0]


def _save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


#: images per feature-network batch for every reference: a convolution's float32 result can depend on its batch
#: size in the last bits, so one batch size makes the statistics the same whichever caller computes them first
REFERENCE_BATCH = 100


def _extract_stream(batches: Iterator[np.ndarray], extractor: FeatureExtractor) -> Features:
    parts = [extractor.extract(b, REFERENCE_BATCH) for b in batches]
    if not parts:
        raise HarnessError("the reference holds no images")
    return Features.concat(parts)


def _chunks(images: np.ndarray, size: int = 1000) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start:start + size]


# ---- image folders ---------------------------------------------------------------------------------

def list_images(root: Path, max_images: int | None = None) -> list[Path]:
    files = [Path(p) for p in list_image_files(root)]
    if max_images is not None and len(files) > max_images:
        keep = np.random.RandomState(0).choice(len(files), max_images, replace=False)
        files = [files[i] for i in sorted(keep)]
    return files


def _folder_batches(files: list[Path], size: int, chunk: int = 500) -> Iterator[np.ndarray]:
    from PIL import Image

    for start in range(0, len(files), chunk):
        out = []
        for p in files[start:start + chunk]:
            try:
                with Image.open(p) as im:
                    out.append(center_crop_arr(im.convert("RGB"), size))
            except OSError as err:
                raise HarnessError(f"reference image {p} cannot be read ({err}); remove or replace it") from err
        yield np.stack(out)


#: what np.load raises on a truncated, corrupt or pickle-carrying npz (pickles are never loaded)
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _unreadable(path: Path, err: BaseException) -> HarnessError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return HarnessError(f"reference {path} (--reference / eval.reference) is not a readable npz ({first}); "
                        "regenerate it or point at another reference")


# ---- the entry point -------------------------------------------------------------------------------

@dataclass
class _Source:
    """What a reference string names: its identity (for the cache key) and where its images are."""
    identity: str
    resolution: int                      # -1 for an npz until arr_0 is read
    count: int
    images: np.ndarray | None = None     # digits: in memory
    files: list[Path] = field(default_factory=list)   # an image folder's files
    npz_path: Path | None = None
    adm_stats: dict[str, np.ndarray] | None = None     # ADM's precomputed Inception statistics


def _identify(ref: str, extractor: FeatureExtractor, image_size: int | None, max_images: int | None) -> _Source:
    """'digits', an ADM npz or an image folder -> _Source; HarnessError naming the fix otherwise."""
    if ref == "digits":
        gray, _ = load_digits()
        return _Source(f"digits:{hashlib.sha256(gray.tobytes()).hexdigest()[:16]}", gray.shape[1], len(gray),
                       images=np.repeat(gray[..., None], 3, axis=-1))
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".npz":
        adm_stats = None
        try:
            with np.load(path) as npz:
                keys = set(npz.files)
                if all(k in keys for k in ADM_STAT_KEYS) and extractor.name == "inception":
                    adm_stats = {k: npz[k] for k in ADM_STAT_KEYS}
        except _NPZ_ERRORS as err:
            raise _unreadable(path, err) from err
        if "arr_0" not in keys and adm_stats is None:
            raise HarnessError(
                f"reference {path} has no key 'arr_0' (images, N x H x W x 3 uint8)"
                + (" and its precomputed mu/sigma/mu_s/sigma_s are Inception statistics, unusable in "
                   f"feature space {extractor.name!r}" if all(k in keys for k in ADM_STAT_KEYS) else "")
                + "; save the reference images as arr_0 (np.savez)")
        return _Source(_npz_identity(path), -1, -1, npz_path=path, adm_stats=adm_stats)
    if path.is_dir():
        files = list_images(path, max_images)
        if not files:
            raise HarnessError(f"reference folder {path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                               "point --reference / eval.reference at an image folder, an npz or 'digits'")
        if image_size is None:
            from PIL import Image
            with Image.open(files[0]) as im:
                image_size = min(im.size)
        rel = [(str(p.relative_to(path)), p.stat().st_size) for p in files]
        return _Source(f"folder:{path.name}:{_sha(rel)[:16]}", int(image_size), len(files), files=files)
    raise HarnessError(f"reference {ref!r} (--reference / eval.reference) is neither 'digits', an existing "
                       ".npz file, nor an image folder; fix the path")


def _cache_paths(src: _Source, extractor: FeatureExtractor, max_images: int | None) -> tuple[Path, Path]:
    """Where a reference's statistics and its pool features are cached: named by the source, keyed by
    its identity, the feature space, the resolution (an npz: its arr_0) and max_images."""
    key = _sha({"identity": src.identity, "feature": extractor.identity, "batch": REFERENCE_BATCH,
                "resolution": src.resolution if src.npz_path is None else "arr_0", "max_images": max_images})[:20]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in src.identity.split(":")[1])[:40]
    stats_path = cache_dir("reference") / f"{slug}-{extractor.identity}-{key}.npz"
    return stats_path, stats_path.with_suffix(".pool.npy")


def _source_images(src: _Source) -> np.ndarray:
    """The images of a digits or npz reference (N x H x W x 3 uint8), checked."""
    if src.images is not None:
        return src.images
    try:
        with np.load(src.npz_path) as npz:
            arr = npz["arr_0"]
    except _NPZ_ERRORS as err:
        raise _unreadable(src.npz_path, err) from err
    return check_images(arr, f"reference {src.npz_path} key arr_0")


def _read_cached(stats_path: Path, ref: str, extractor: FeatureExtractor) -> tuple[dict, dict] | None:
    """(meta, statistics) from the cache file, or None when it is unreadable (it is then recomputed)."""
    try:
        with np.load(stats_path) as npz:
            meta = json.loads(str(npz["meta"]))
            arrays = {k: npz[k] for k in ADM_STAT_KEYS}
    except (OSError, KeyError, ValueError) as err:
        log.warning("ignoring unreadable reference cache %s (%s)", stats_path, err)
        return None
    log.info("reference %s: cached %s statistics %s", ref, extractor.name, stats_path)
    return meta, arrays


def _compute_stats(src: _Source, ref: str, extractor: FeatureExtractor) -> tuple[dict, int, int, np.ndarray | None]:
    """(statistics, resolution, image count, pool features or None): ADM's precomputed Inception
    statistics when the npz has them, else the reference's features extracted once."""
    if src.adm_stats is not None:
        log.info("reference %s: using ADM's precomputed Inception statistics", ref)
        shape = _npz_member_shape(src.npz_path, "arr_0") or (0, 0)
        return src.adm_stats, int(shape[1]), int(shape[0]), None
    log.info("reference %s: computing %s statistics (once; cached)", ref, extractor.name)
    resolution, count = src.resolution, src.count
    if src.files:
        feats = _extract_stream(_folder_batches(src.files, resolution), extractor)
    else:
        imgs = _source_images(src)
        resolution, count = int(imgs.shape[1]), int(imgs.shape[0])
        feats = _extract_stream(_chunks(imgs), extractor)
    mu, sigma = gaussian_stats(feats.pool)
    mu_s, sigma_s = gaussian_stats(feats.spatial)
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}, resolution, count, feats.pool


def load_reference(reference: str, extractor: FeatureExtractor, image_size: int | None = None,
                   max_images: int | None = None, use_cache: bool = True) -> ReferenceStats:
    """Reference statistics of `reference` ('digits', an ADM npz, or an image folder) in `extractor`'s space.

    image_size: folder references are centre-cropped to it (default: the first image's shorter side);
    npz and digits references keep their own resolution (the extractor resizes as it needs).
    """
    ref = str(reference)
    src = _identify(ref, extractor, image_size, max_images)
    stats_path, pool_path = _cache_paths(src, extractor, max_images)

    def compute_pool() -> np.ndarray:  # precision/recall's features, extracted on first use
        if use_cache and pool_path.is_file():
            return np.load(pool_path)
        log.info("reference %s: extracting %s pool features for precision/recall", ref, extractor.name)
        feats = _extract_stream(_chunks(_source_images(src)), extractor)
        if use_cache:
            atomic_write(pool_path, lambda f: np.save(f, feats.pool))
        return feats.pool

    def build(meta: dict, arrays: dict, pool: np.ndarray | None) -> ReferenceStats:
        return ReferenceStats(source=ref, identity=src.identity, feature_space=extractor.name,
                              feature_identity=extractor.identity, resolution=int(meta["resolution"]),
                              num_images=int(meta["num_images"]), _pool=pool, _pool_loader=compute_pool,
                              **{k: np.asarray(arrays[k], np.float64) for k in ADM_STAT_KEYS})

    cached = _read_cached(stats_path, ref, extractor) if use_cache and stats_path.is_file() else None
    if cached is not None:
        return build(*cached, None)
    arrays, resolution, count, pool = _compute_stats(src, ref, extractor)
    if use_cache and pool is not None:
        atomic_write(pool_path, lambda f: np.save(f, pool))
    meta = {"source": ref, "identity": src.identity, "feature_space": extractor.name,
            "feature_identity": extractor.identity, "resolution": resolution, "num_images": count}
    if use_cache:
        _save_npz(stats_path, meta=np.array(json.dumps(meta)), **arrays)
    return build(meta, arrays, pool)
