"""Pre-flight (`harness sweep`, `harness sweep --dry-run`): every input of a sweep checked before anything
is submitted, all problems reported at once, one line each, exit 2, nothing written and nothing queued."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness.launch.preflight import preflight, reference_problems
from harness.config.spec import load_spec
from slurm_tools import need_slurm
from test_autoencoder import tiny_vae
from test_sweep_e2e import ROOT, subprocess_env

UNSET = "PREFLIGHT_TEST_UNSET_VAR"


def imagenet_like(tmp_path: Path, classes: int = 3, **launcher) -> dict:
    """A latent-space, Inception-feature sweep in the shape of sweeps/gflops.yaml, with tiny inputs in tmp."""
    data = tmp_path / "train"
    for c in range(classes):
        (data / f"n{c:08d}").mkdir(parents=True)
    return {"name": "pre", "models": ["DiT-2x32x2/2"],
            "data": {"dataset": "imagefolder", "path": str(data), "image_size": 64, "autoencoder": "sd-vae-ft-ema",
                     "autoencoder_path": str(tmp_path / "vae"), "num_classes": classes},
            "train": {"steps": 10, "global_batch": 8},
            "eval": {"at_steps": [10], "features": "inception", "reference": str(tmp_path / "ref.npz"),
                     "inception_weights": str(tmp_path / "inception.pth"), "num_samples": 10},
            "launcher": {"kind": "local", **launcher}}


def write_spec(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def write_reference(path: Path, size: int) -> None:
    np.savez(path, arr_0=np.zeros((4, size, size, 3), np.uint8))


def make_inputs_whole(tmp_path: Path) -> None:
    from harness.metrics.inception import write_random_inception_weights

    tiny_vae().save_pretrained(tmp_path / "vae")
    write_random_inception_weights(tmp_path / "inception.pth", calibration_images=2)
    write_reference(tmp_path / "ref.npz", 64)


def sweep(spec: Path, results: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", "sweep", str(spec), "--results", str(results), *extra],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def problem_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    head, *lines = proc.stderr.strip().splitlines()
    assert "problem(s) found before submitting anything; nothing was submitted" in head
    return [x.strip() for x in lines]


def test_whole_inputs_pass_the_dry_run_and_nothing_is_written(tmp_path):
    make_inputs_whole(tmp_path)
    spec = write_spec(tmp_path, imagenet_like(tmp_path))
    assert preflight(load_spec(spec), tmp_path / "results") == []
    proc = sweep(spec, tmp_path / "results", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "pre-flight passed" in proc.stdout and not (tmp_path / "results").exists()


def test_every_problem_is_listed_at_once_and_nothing_is_written(tmp_path):
    """Missing reference, missing VAE weights, an unset variable, missing Inception weights and a data folder
    with the wrong class count: five lines in one run, no results folder, no job."""
    doc = imagenet_like(tmp_path)
    doc["data"]["num_classes"] = 5                               # the folder has 3
    doc["eval"]["inception_weights"] = f"${{{UNSET}}}/inception.pth"
    spec = write_spec(tmp_path, doc)                             # no vae/, no ref.npz
    lines = problem_lines(sweep(spec, tmp_path / "results"))
    assert len(lines) == 4, lines  # the unset variable hides the Inception file behind it: not also reported missing
    expected = ["data.path: ", "data.autoencoder_path: ", "eval.inception_weights: ", "eval.reference: "]
    assert [x.split(" ", 1)[0] + " " for x in lines] == expected
    assert "3 class folders, data.num_classes is 5" in lines[0]
    assert f"uses the unset environment variable {UNSET}" in lines[2]
    assert "ref.npz does not exist" in lines[3]
    assert all("Fix: " in x for x in lines)
    assert not (tmp_path / "results").exists()
    doc["eval"]["inception_weights"] = str(tmp_path / "absent.pth")
    lines = problem_lines(sweep(write_spec(tmp_path, doc), tmp_path / "results", "--dry-run"))
    assert len(lines) == 4 and "Inception weights file" in lines[2] and "absent.pth (--inception-weights" in lines[2]


def test_reference_batches_are_opened_and_checked_against_the_spec(tmp_path):
    write_reference(tmp_path / "small.npz", 32)
    (wrong_size,) = reference_problems(tmp_path / "small.npz", 64, "inception")
    assert "its images are 32x32, the sweep's data.image_size is 64" in wrong_size
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.zeros((2048, 2048)), mu_s=np.zeros(2023),
             sigma_s=np.zeros((2023, 2023)))
    assert reference_problems(tmp_path / "stats.npz", 256, "inception") == []  # ADM's statistics alone will do
    (digits,) = reference_problems(tmp_path / "stats.npz", 256, "digits")  # ...but only in Inception space
    assert "no images (key arr_0)" in digits
    np.savez(tmp_path / "badmu.npz", arr_0=np.zeros((2, 256, 256, 3), np.uint8), mu=np.zeros(1000))
    (bad_mu,) = reference_problems(tmp_path / "badmu.npz", 256, "inception")
    assert "mu has shape (1000,)" in bad_mu
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))  # an npz member holding a pickle
    import zipfile
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as zf:
        zf.write(tmp_path / "obj.npy", "arr_0.npy")
    (pickled,) = reference_problems(tmp_path / "pickled.npz", 256, "inception")
    assert "holds Python objects" in pickled
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (junk,) = reference_problems(tmp_path / "junk.npz", 256, "inception")
    assert "is not a readable npz" in junk


@pytest.mark.slurm
@pytest.mark.parametrize("reference", ["missing", "wrong size"])
def test_on_slurm_five_problems_in_one_run_and_nothing_queued(tmp_path, reference):
    """The issue's case on the local Slurm: a missing (or wrong-size) reference, missing VAE weights, an unset
    variable and a partition the cluster does not have, each one line, with sbatch --test-only's own words."""
    need_slurm()
    from harness.metrics.inception import write_random_inception_weights

    write_random_inception_weights(tmp_path / "inception.pth", calibration_images=2)
    if reference == "wrong size":
        write_reference(tmp_path / "ref.npz", 32)
    doc = imagenet_like(tmp_path, kind="slurm", partition="no-such-partition", cpus_per_task=1, mem_gb=1)
    doc["data"]["path"] = f"${{{UNSET}}}/train"
    doc["name"] = f"pre-{reference.replace(' ', '-')}"
    spec = write_spec(tmp_path, doc)
    lines = problem_lines(sweep(spec, tmp_path / "results"))
    assert [x.split(":", 1)[0] for x in lines] == ["data.path", "data.autoencoder_path", "eval.reference",
                                                   "launcher.partition"], lines
    assert f"unset environment variable {UNSET}" in lines[0]
    assert "no sd-vae-ft-ema weights here" in lines[1]
    assert ("does not exist" if reference == "missing" else "its images are 32x32") in lines[2]
    assert "Slurm refuses the job (sbatch --test-only: " in lines[3] and "partition" in lines[3].lower()
    assert not (tmp_path / "results").exists()
    queued = subprocess.run(["squeue", "-h", "-n", f"dit-{doc['name']}", "-o", "%i"], capture_output=True, text=True)
    assert queued.returncode == 0 and queued.stdout.strip() == ""
