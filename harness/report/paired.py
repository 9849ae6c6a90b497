"""The paired standard error of two FIDs' difference, from the features their evaluations stored.

`PairedErrors` is the `harness.study.analysis.PairedSE` the report hands to the verdict helpers: given two
rows of the tidy frame (per_model rows), it proves their samples paired (`harness.study.pairing`), loads both
features files (harness.config.layout names them) and the reference's statistics, and returns the paired
bootstrap's standard error of FID_a - FID_b (`harness.metrics.stats.fid_difference`, whose docstring holds
the verdict rule). Where it cannot -- not provably paired, a file or the reference missing -- it returns None,
the comparison falls back to the two errors combined, and `reasons` counts why.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Mapping

import numpy as np

from harness.config.spec import expand_path
from harness.errors import HarnessError
from harness.io import atomic_write_json, cache_dir
from harness.study.pairing import pairing_problem

log = logging.getLogger(__name__)


class PairedErrors:
    """Callable (row_a, row_b) -> the paired standard error of FID_a - FID_b, or None (see the module docstring).

    runs: run_id -> run.json's dict (for eval.inception_weights); n_boot, seed: fid_difference's. Each features
    file and reference is read once; each pair is computed once."""

    def __init__(self, runs: Mapping[str, dict], n_boot: int | None = None, seed: int = 0):
        from harness.metrics.stats import FID_BOOTSTRAP  # torch: only when a report is rendered

        self.runs, self.seed = runs, seed
        self.n_boot = FID_BOOTSTRAP if n_boot is None else n_boot
        self.reasons: Counter = Counter()   # why a comparison was not paired -> how many
        self.paired = 0
        self._cache: dict = {}

    def __call__(self, a: Mapping, b: Mapping) -> float | None:
        key = (a.get("fid_features"), b.get("fid_features"))
        if key not in self._cache:
            self._cache[key] = self._compute(a, b)
        return self._cache[key]

    def _compute(self, a: Mapping, b: Mapping) -> float | None:
        problem = pairing_problem(a, b) or _features_problem(a) or _features_problem(b)
        if problem is None:
            try:
                se = self._se(a, b)
            except (HarnessError, OSError, ValueError) as err:
                problem = f"unreadable: {err}"
            else:
                self.paired += 1
                return se
        self.reasons[problem] += 1
        log.info("FID comparison %s vs %s: combined error (%s)", a.get("label"), b.get("label"), problem)
        return None

    def _se(self, a: Mapping, b: Mapping) -> float | None:
        """fid_difference's error, cached on disk: at FID-50K in Inception space one pair costs minutes on a few
        cores, and a report is rendered again and again. Keyed by both features files (written once, atomically:
        path, size and mtime name their content), the reference, n_boot and seed."""
        from harness.metrics.stats import fid_difference  # torch: only when a report is rendered

        key = [[str(Path(r["fid_features"]).resolve()), *_stamp(r["fid_features"])] for r in (a, b)]
        key += [str(a["feature_space"]), str(a["reference"]), int(a["image_size"]), self.n_boot, self.seed]
        cached = cache_dir("paired") / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]}.json"
        try:
            return json.loads(cached.read_text())["fid_diff_se"]
        except (OSError, ValueError, KeyError):
            pass
        mu, sigma = self._reference(a)
        fa, fb = (np.load(str(r["fid_features"]), allow_pickle=False) for r in (a, b))
        se = fid_difference(fa, fb, mu, sigma, n_boot=self.n_boot, seed=self.seed)["fid_diff_se"]
        atomic_write_json(cached, {"key": key, "fid_diff_se": se})
        return se

    def _reference(self, row: Mapping) -> tuple[np.ndarray, np.ndarray]:
        """The reference's FID statistics (mu (D,), sigma (D, D)) in the row's feature space (cached by metrics)."""
        # torch: the feature network and the reference load only when a report pairs two FIDs
        from harness.metrics import get_feature_extractor, load_reference

        space, ref, size = str(row["feature_space"]), str(row["reference"]), int(row["image_size"])
        key = ("reference", space, ref, size)
        if key not in self._cache:
            ev = self.runs.get(str(row.get("run_id")), {}).get("eval", {})
            weights = expand_path(ev.get("inception_weights"), "eval.inception_weights")
            extractor = (get_feature_extractor("inception", weights=weights) if space.startswith("inception")
                         else get_feature_extractor(space))
            if extractor.name != space:
                raise HarnessError(f"the run's feature network is {extractor.name}, its records' {space}")
            stats = load_reference(expand_path(ref, "eval.reference"), extractor, image_size=size)
            self._cache[key] = (stats.mu, stats.sigma)
        return self._cache[key]

    def note(self) -> str:
        """One sentence for the report: how many comparisons were paired, and why the others were not."""
        if not self.paired and not self.reasons:
            return ""
        why = "; ".join(f"{n}: {r}" for r, n in self.reasons.most_common())
        return (f"{self.paired} of {self.paired + sum(self.reasons.values())} FID comparisons used the paired "
                "standard error of the difference (the two evaluations' samples share noise and labels; bootstrap "
                "over the stored features)" + (f", the others the two errors combined ({why})." if why else "."))


def _stamp(path: str) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns


def _features_problem(row: Mapping) -> str | None:
    path = row.get("fid_features")
    if not isinstance(path, str) or not path:
        return "no stored features"
    if not Path(path).is_file():
        return "features file missing"
    return None
