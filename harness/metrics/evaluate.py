"""`harness evaluate`: the five metrics of an ADM-layout npz of samples, as a table and as JSON."""
from __future__ import annotations

import logging
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.config.arguments import csv_list, positive_int
from harness.config.layout import RunFolder, read_run_json, samples_setting
from harness.config.vocab import FEATURE_SPACES, METRIC_LABELS, METRICS, normalize_metrics
from harness.io import atomic_write_json, read_jsonl
from harness.metrics import compute_metrics, get_feature_extractor, load_reference
from harness.metrics.features import check_images

log = logging.getLogger(__name__)


def load_samples(path: str | Path) -> np.ndarray:
    """arr_0 of an ADM-layout npz: uint8 (N, H, W, 3)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HarnessError(_not_kept(path) or f"samples file {path} (--samples) does not exist; write it with "
                           "`harness sample`")
    try:
        with np.load(path) as npz:
            if "arr_0" not in npz.files:
                raise HarnessError(f"samples file {path} has no key 'arr_0' (keys: {', '.join(npz.files)}); "
                                   "save the images as the first positional array of np.savez")
            images = npz["arr_0"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise HarnessError(f"samples file {path} is not a readable npz ({err}); regenerate it") from err
    return check_images(images, f"samples file {path} key arr_0")


def _not_kept(path: Path) -> str | None:
    """The error for a run's evaluation npz that its eval.keep_samples did not keep: owned by a record of eval.jsonl
    (`RunFolder.samples_owners`, a legacy name too), so evaluated, but not on disk (None for any other path)."""
    folder = RunFolder(path.parent.parent)
    if samples_setting(path.name) is None or path.parent.name != "samples" or not folder.run_json.is_file():
        return None
    try:
        run, _ = read_run_json(folder.root)
    except HarnessError:
        return None
    record = folder.samples_owners(list(read_jsonl(folder.eval_log))).get(path.name)
    if run.eval.keep_samples == "all" or record is None:
        return None
    kept = "keeps no npz" if run.eval.keep_samples == "none" else "keeps the highest evaluated step's npz only"
    ev = run.eval
    # the record's own setting (a record older than one of these keys: the run's value)
    was = {key: record.get(key, getattr(ev, key)) for key in ("guidance_channels", "sampler", "num_samples")}
    return (f"samples file {path} (--samples) was not kept: {folder.run_json} has eval.keep_samples: "
            f"{ev.keep_samples}, which {kept}; its metrics are in {folder.eval_log}. Fix: sample that step again "
            f"with `harness sample --checkpoint {folder.checkpoint(int(record['step']))} --steps "
            f"{int(record['sampling_steps'])} --cfg-scale {float(record['cfg_scale']):g} --guidance-channels "
            f"{was['guidance_channels']} --sampler {was['sampler']} --num-samples {was['num_samples']} --out DIR` "
            "(new seeds), and set eval.keep_samples: all to keep the npz of evaluations to come")


def format_table(result: dict) -> str:
    rows = [("feature space", result["feature_space"]), ("samples", str(result["num_samples"])),
            ("reference", str(result["reference"]))]
    for key, label in METRIC_LABELS.items():
        if result.get(key) is not None:
            rows.append((label, f"{result[key]:.4f}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def add_evaluate_arguments(s) -> None:
    """`harness evaluate`'s flags."""
    s.add_argument("--samples", required=True, help="npz in the ADM layout (arr_0: N x H x W x 3 uint8)")
    s.add_argument("--reference", required=True, help="ADM reference npz, an image folder, or 'digits'")
    s.add_argument("--metrics", type=csv_list, default=list(METRICS), help=f"comma-separated: {','.join(METRICS)}")
    s.add_argument("--features", choices=FEATURE_SPACES, default="inception")
    s.add_argument("--inception-weights", default=None, help="local FID Inception weights file")
    s.add_argument("--batch-size", type=positive_int, default=100)
    s.add_argument("--json", default=None, help="write the metrics here too")


def cli_evaluate(args) -> int:
    t0 = time.perf_counter()
    metrics = normalize_metrics(args.metrics)  # cheap checks first: no model is built for a typo
    if args.reference != "digits" and not Path(args.reference).expanduser().exists():
        raise HarnessError(f"reference {args.reference} (--reference) does not exist; give an ADM npz, "
                           "an image folder, or 'digits'")
    images = load_samples(args.samples)
    extractor = get_feature_extractor(args.features, weights=args.inception_weights)
    reference = load_reference(args.reference, extractor, image_size=int(images.shape[1]))
    result = compute_metrics(images, reference, extractor, metrics=metrics, batch_size=args.batch_size)
    result.update(samples=str(args.samples), reference=str(args.reference),
                  feature_identity=extractor.identity, wall_s=round(time.perf_counter() - t0, 3))
    print(format_table(result))
    if args.json:
        atomic_write_json(args.json, result)
        log.info("wrote %s", args.json)
    return 0
