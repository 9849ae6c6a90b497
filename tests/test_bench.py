"""`harness bench`: real timings of a tiny model, the stated flops convention, table and JSON output."""
from __future__ import annotations

import json

import pytest
import torch

from harness.training.bench import CONVENTION, bench, peak_tflops
from harness.cli import main
from tolerance import fp64_bound


def test_bench_measures_and_applies_the_flops_convention():
    r = bench("DiT-2x32x2/2", batch=4, steps=2, warmup=1, input_size=8, in_channels=4)
    assert r.train_steps_per_s > 0 and r.sample_forward_per_s > 0
    assert r.train_images_per_s == r.train_steps_per_s * 4
    assert r.sample_images_per_s_one_step == r.sample_forward_per_s * 4
    assert r.gflops > 0 and r.params > 0
    # Gflops (multiply-adds) x 2 flops x 3 passes x images/s
    # float64, a few roundings each side; the value's scale is the machine's speed, so relative
    assert r.achieved_tflops == pytest.approx(r.gflops * 6 * r.train_images_per_s / 1e3, rel=fp64_bound(8), abs=0)
    assert r.mfu is None and peak_tflops(torch.device("cpu"), "bf16") is None


def test_bench_cli_json_and_table(capsys):
    assert main(["bench", "--model", "DiT-2x32x2/2", "--batch", "2", "--steps", "1", "--warmup", "1",
                 "--input-size", "8", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "DiT-2x32x2/2" and out["batch"] == 2 and out["convention"] == CONVENTION
    assert main(["bench", "--model", "DiT-2x32x2/2", "--batch", "2", "--steps", "1", "--warmup", "1",
                 "--input-size", "8"]) == 0
    table = capsys.readouterr().out
    assert "2 flops/multiply-add x 3 (forward+backward)" in table and "ONE denoising step" in table


def test_bench_suite_on_cpu_writes_json_and_table_that_plan_reads(tmp_path, capsys):
    """A short suite on this CPU: the JSON and the markdown table it writes, the best configuration
    per model, and `harness plan --throughput-from` giving each run its own model's measured speed."""
    out = tmp_path / "bench.json"
    models = "DiT-2x32x2/4,DiT-2x32x2/2"
    assert main(["bench", "--suite", models, "--batch", "4", "--steps", "1", "--warmup", "1",
                 "--input-size", "8", "--in-channels", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    data = json.loads(out.read_text())["results"]
    assert [r["model"] for r in data] == ["DiT-2x32x2/4", "DiT-2x32x2/2"]  # one CPU config each
    assert all(r["error"] is None and r["train_images_per_s"] > 0 and r["micro_batch"] == 4 for r in data)
    assert (tmp_path / "bench.md").read_text().strip() == table.strip()
    assert table.count("**DiT-2x32x2/") == 2 and "| model | config | images/s |" in table
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nmodels: [DiT-2x32x2/4, DiT-2x32x2/2]\ntrain: {steps: 100, global_batch: 8}\n"
                    "eval: {at_steps: [100], num_samples: 10, sampling_steps: [5]}\n")
    assert main(["plan", str(spec), "--throughput-from", str(out), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for run, r in zip(plan["runs"], data):
        assert run["model"] == r["model"]
        assert run["train_accel_hours"] == pytest.approx(8 * 100 / r["train_images_per_s"] / 3600, rel=fp64_bound(8),
                                                         abs=0)
    # a sweep whose models were not measured: one line naming them
    spec.write_text(spec.read_text().replace("DiT-2x32x2/4, ", "DiT-S/8, "))
    assert main(["plan", str(spec), "--throughput-from", str(out)]) == 2
    assert "no measurement for DiT-S/8" in capsys.readouterr().err


def test_bench_micro_batch_and_compile_flags(capsys):
    assert main(["bench", "--model", "DiT-2x32x2/2", "--batch", "4", "--micro-batch", "2", "--steps", "1",
                 "--warmup", "1", "--input-size", "8", "--compile", "off", "--format", "json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["micro_batch"] == 2 and r["compile"] is False and r["batch"] == 4
    assert main(["bench", "--model", "DiT-2x32x2/2", "--batch", "4", "--micro-batch", "3"]) == 2
    assert "--micro-batch: 3 does not divide the per-GPU batch of 4" in capsys.readouterr().err


def test_bench_latent_stage_and_end_to_end_evaluation(capsys):
    """The SD VAE's and Inception's real architectures (random weights); evaluation runs sample_images and
    the feature network itself, and its projection follows from the two timed batches."""
    assert main(["bench", "--model", "DiT-2x32x2/2", "--batch", "2", "--steps", "1", "--warmup", "1",
                 "--input-size", "2", "--latents", "--sampling-steps", "250", "--eval-samples", "10",
                 "--eval-batch", "2", "--format", "json"]) == 0
    latents, ev = json.loads(capsys.readouterr().out)["stages"]
    assert latents["stage"] == "latents" and latents["image_size"] == 16 and latents["encodes_per_s"] > 0
    assert ev["stage"] == "evaluation" and ev["decode"] == "sd-vae-ft-ema" and ev["features"].startswith("inception")
    assert (ev["batch"], ev["precision"], ev["compiled"], ev["sampling_steps"]) == (2, "fp32", False, 250)
    (lo, hi), (t_lo, t_hi) = ev["measured_steps"], ev["measured_s"]
    per_step = max(t_hi - t_lo, 1e-9) / (hi - lo)
    assert ev["forward_images_per_s"] == pytest.approx(2 / per_step, rel=1e-9)
    batch_s = ev["fixed_s_per_batch"] + 250 * per_step             # 5 batches of 2 make the 10 images
    assert ev["projected_h"] == pytest.approx(5 * batch_s / 3600, rel=1e-9)
    assert ev["images_per_s"] > 0 and ev["images_per_s_per_step"] == pytest.approx(ev["images_per_s"] * 250, rel=1e-12)
