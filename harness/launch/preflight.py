"""Pre-flight: every input of a sweep's runs checked before anything is submitted.

`harness sweep` runs these checks first (and `harness sweep --dry-run` stops after them): the
environment variables the spec's paths name, the data folder and its class count, the VAE weights,
the feature network's weights, the reference batch (opened; its keys, shapes and image size against
the spec), that the results and cache folders can be written, that a `checkpoints_from` sweep has
results, and on Slurm that `sbatch --test-only` accepts the partition, account, qos, GPUs, time and
memory. A sweep's runs share their data, eval and launcher sections, so each input is checked once.

Every problem is collected, not raised at the first: the user gets all of them in one go, one line
each ("KEY: problem. Fix: ..."), exit 2, nothing submitted and nothing written.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

from harness.config import layout
from harness.errors import HarnessError
from harness.io import cache_root, npz_headers
from harness.config.spec import INIT_FROM_FIX, SweepSpec, expand_path

#: ADM's precomputed Inception statistics of a reference batch and their shapes (pool 2048-d, spatial 2023-d)
ADM_STAT_SHAPES = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")

# (words in sbatch's refusal, the spec key to change, how to find a value the cluster accepts); first
# match wins, so "Invalid account or account/partition combination" names the account
SBATCH_REFUSALS = (
    ("gres", "launcher.gpus_per_node", "use a GPU count a node of the partition has (0 where there are none)"),
    ("account", "launcher.account", "`sacctmgr show assoc user=$USER format=account,partition` lists yours"),
    ("qos", "launcher.qos", "`sacctmgr show qos format=name` lists them"),
    ("time limit", "launcher.timeout_min", "stay within the partition's limit (`sinfo -o '%P %l'`)"),
    ("partition", "launcher.partition", "`sinfo -s` lists the partitions"),
    ("memory", "launcher.mem_gb", "ask for at most a node's memory (`sinfo -o '%P %m'`)"),
    ("node configuration", "launcher.gpus_per_node, cpus_per_task or mem_gb",
     "ask for what one node has (`sinfo -o '%P %c %m %G'`)"),
    ("processors", "launcher.tasks_per_node, gpus_per_node (one rank per GPU) or cpus_per_task",
     "ask for at most the CPUs a node has (`sinfo -o '%P %c'`)"),
)
_SBATCH_OTHER = ("launcher (partition, account, qos, gpus_per_node, timeout_min or additional)",
                 "compare with `sinfo` and your site's documentation")


def sbatch_fix(said: str) -> tuple[str, str]:
    """(spec key to change, how to find a good value) for the words of an sbatch refusal."""
    text = said.lower()
    return next(((key, how) for word, key, how in SBATCH_REFUSALS if word in text), _SBATCH_OTHER)


def _expanded(value: str | None, key: str, problems: list[str]) -> str | None:
    """`value` with ~ and ${VAR} expanded; None (and one problem per unset variable) if any is unset."""
    if value is None:
        return None
    unset = [v for v in dict.fromkeys(_VAR.findall(value)) if v not in os.environ]
    for var in unset:
        problems.append(f"{key}: {value!r} uses the unset environment variable {var}. "
                        f"Fix: export {var}=/your/path, or write the path into the spec.")
    return None if unset else os.path.expanduser(os.path.expandvars(value))


def _check_data(spec: SweepSpec, problems: list[str]) -> None:
    d = spec.data
    path = _expanded(d.path, "data.path", problems)
    if d.dataset != "imagefolder" or spec.train.steps == 0 or spec.checkpoints_from or path is None:
        return
    root = Path(path)
    if not root.is_dir():
        problems.append(f"data.path: {root} is not a folder. Fix: point it (or the variable it names) at the "
                        "ImageNet train folder, root/<class>/<image>.")
        return
    classes = sum(1 for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if classes != d.num_classes:
        problems.append(f"data.path: {root} has {classes} class folders, data.num_classes is {d.num_classes}. "
                        "Fix: point data.path at the train split (one folder per class) or set data.num_classes.")


def _check_autoencoder(spec: SweepSpec, problems: list[str]) -> None:
    from harness.data.autoencoder import locate_vae  # diffusers and torch: only for latent-space sweeps

    d = spec.data
    path = _expanded(d.autoencoder_path, "data.autoencoder_path", problems)
    if d.autoencoder == "identity" or (d.autoencoder_path and path is None):
        return
    try:
        locate_vae(d.autoencoder, path)
    except HarnessError as err:
        problems.append(f"data.autoencoder_path: {err}")


def _check_features(spec: SweepSpec, problems: list[str]) -> None:
    e = spec.eval
    path = _expanded(e.inception_weights, "eval.inception_weights", problems)
    if e.features != "inception" or (e.inception_weights and path is None):
        return
    from harness.metrics.inception import resolve_weights  # torch: only for Inception sweeps

    try:
        resolve_weights(path)
    except HarnessError as err:
        problems.append(f"eval.inception_weights: {err}")


def _npz_shapes(path: Path) -> dict[str, tuple]:
    """{array name: shape} of an npz, from each member's header; ValueError for a member holding a pickle."""
    shapes = {}
    for name, (shape, dtype) in npz_headers(path).items():
        if dtype.hasobject:
            raise ValueError(f"{name}.npy holds Python objects (a pickle), which the harness never loads")
        shapes[name] = shape
    return shapes


def reference_problems(path: Path, image_size: int, features: str) -> list[str]:
    """What is wrong with an ADM reference npz for a sweep at `image_size` in `features` space."""
    try:
        shapes = _npz_shapes(path)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        return [f"{path} is not a readable npz ({err}). Fix: point eval.reference at ADM's reference batch "
                "(e.g. VIRTUAL_imagenet256_labeled.npz) or an image folder."]
    out = []
    if "arr_0" not in shapes and not (features == "inception" and set(ADM_STAT_SHAPES) <= set(shapes)):
        out.append(f"{path} has no images (key arr_0) and no Inception statistics (mu, sigma, mu_s, sigma_s). "
                   "Fix: save the reference images as arr_0, N x H x W x 3 uint8.")
    if "arr_0" in shapes:
        shape = shapes["arr_0"]
        if len(shape) != 4 or shape[3] != 3:
            out.append(f"{path}: arr_0 has shape {shape}, not N x H x W x 3. Fix: save RGB images as arr_0.")
        elif shape[1:3] != (image_size, image_size):
            out.append(f"{path}: its images are {shape[1]}x{shape[2]}, the sweep's data.image_size is {image_size}. "
                       f"Fix: use the reference batch of {image_size}x{image_size} images (ADM publishes one per "
                       "resolution).")
    if features == "inception":
        for key, want in ADM_STAT_SHAPES.items():
            if key in shapes and shapes[key] != want:
                out.append(f"{path}: {key} has shape {shapes[key]}, ADM's Inception statistics have {want}. "
                           "Fix: recompute the reference statistics with this harness or use ADM's file.")
    return out


def _check_reference(spec: SweepSpec, problems: list[str]) -> None:
    ref = _expanded(spec.eval.reference, "eval.reference", problems)
    if ref is None or ref == "digits":
        return
    path = Path(ref)
    if path.is_file() and path.suffix == ".npz":
        problems.extend(f"eval.reference: {p}" for p in reference_problems(path, spec.data.image_size,
                                                                           spec.eval.features))
    elif not path.is_dir():
        problems.append(f"eval.reference: {path} does not exist. Fix: point it (or the variable it names) at ADM's "
                        "reference batch (VIRTUAL_imagenet256_labeled.npz) or an image folder.")
    elif next((p for p in path.rglob("*") if p.is_file()), None) is None:
        problems.append(f"eval.reference: the folder {path} holds no files. Fix: point it at a folder of images.")


def _writable(folder: Path) -> bool:
    """Whether `folder` (or, where it does not exist yet, its nearest existing parent) can be written."""
    folder = folder.resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def _check_folders(spec: SweepSpec, results: Path, problems: list[str]) -> None:
    if not _writable(results):
        problems.append(f"--results: {results} cannot be written. Fix: pass --results a folder you can write.")
    cache = cache_root()
    if not _writable(cache):
        problems.append(f"HARNESS_CACHE: the cache folder {cache} cannot be written. Fix: export HARNESS_CACHE "
                        "to a writable folder (latents and Gflops are cached there).")
    if spec.checkpoints_from and not (layout.sweep_dir(results, spec.checkpoints_from) / layout.RUNS_DIR).is_dir():
        problems.append(f"checkpoints_from: no results of sweep {spec.checkpoints_from!r} under {results}. Fix: run "
                        f"`harness sweep sweeps/{spec.checkpoints_from}.yaml` first, or pass --results where they live.")


def sbatch_test_args(spec: SweepSpec) -> list[str]:
    """`sbatch --test-only` arguments asking for what one training job of the sweep asks for."""
    L = spec.launcher
    args = ["sbatch", "--test-only", "--job-name", f"dit-{spec.name}-preflight", f"--nodes={L.nodes}",
            f"--ntasks-per-node={L.ranks_per_node}", f"--cpus-per-task={L.cpus_per_task}",
            f"--mem={max(1, round(L.mem_gb * 1024))}M", f"--time={L.timeout_min}", "--output=/dev/null"]
    if L.gpus_per_node:
        args.append(f"--gres=gpu:{L.gpus_per_node}")
    for key in ("partition", "account", "qos"):
        if getattr(L, key):
            args.append(f"--{key}={getattr(L, key)}")
    for key, value in L.additional.items():
        args.append(f"--{key.replace('_', '-')}={value}" if value not in (None, True) else f"--{key.replace('_', '-')}")
    return args + ["--wrap", "true"]


def _check_slurm(spec: SweepSpec, kind: str, problems: list[str]) -> None:
    if kind != "slurm":
        return
    if shutil.which("sbatch") is None:
        problems.append("launcher.kind: slurm, but `sbatch` is not on PATH. Fix: run on a Slurm login node, start "
                        "a local cluster (sudo scripts/local-slurm.sh), or pass --launcher local.")
        return
    try:
        proc = subprocess.run(sbatch_test_args(spec), capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        problems.append("launcher: `sbatch --test-only` did not answer in 60 s. Fix: check the Slurm controller "
                        "(`scontrol ping`).")
        return
    if proc.returncode != 0:
        said = [x.strip().removeprefix("sbatch: error: ") for x in proc.stderr.splitlines() if "error" in x.lower()]
        said = said or [x.strip() for x in proc.stderr.splitlines() if x.strip()][:1]
        key, how = sbatch_fix(" ".join(said))
        problems.append(f"{key}: Slurm refuses the job (sbatch --test-only: {'; '.join(said)}). Fix: {how}.")


def preflight(spec: SweepSpec, results: str | Path, launcher: str | None = None) -> list[str]:
    """Every problem with the sweep's inputs, one line each ("KEY: problem. Fix: ..."); [] when ready."""
    problems: list[str] = []
    _check_data(spec, problems)
    _check_autoencoder(spec, problems)
    _check_features(spec, problems)
    _check_reference(spec, problems)
    _check_folders(spec, Path(results), problems)
    _check_slurm(spec, launcher or spec.launcher.kind, problems)
    return problems


def require_init_weights(spec: SweepSpec) -> None:
    """train.init_from's weights fit every run's model and block; else one line naming the file and the
    first mismatch (checked first: every run would fail the same way)."""
    if spec.train.init_from is None:
        return
    from harness.interop.convert import check_init_source  # torch: only for sweeps that start from weights

    try:
        check_init_source(expand_path(spec.train.init_from, "train.init_from"), spec.expand())
    except HarnessError as err:
        raise HarnessError(f"{spec.path}: train.init_from: {str(err).rstrip('.')}. Fix: {INIT_FROM_FIX}.") from None


def require_ready(spec: SweepSpec, results: str | Path, launcher: str | None = None) -> None:
    """HarnessError listing every problem (one line each) unless the sweep's inputs are all there."""
    require_init_weights(spec)
    problems = preflight(spec, results, launcher)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise HarnessError(f"{spec.path}: {len(problems)} problem(s) found before submitting anything; "
                           f"nothing was submitted:\n{lines}")
