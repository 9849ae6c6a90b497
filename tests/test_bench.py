"""`harness bench`: real timings of a tiny model, the stated flops convention, table and JSON output."""
from __future__ import annotations

import json

import pytest
import torch

from harness.training.bench import CONVENTION, bench, peak_tflops
from harness.cli import main
from harness.errors import HarnessError
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


def test_suite_cut_short_continues_from_its_file(tmp_path, monkeypatch, capsys):
    """The suite rewrites its file after each measurement: cut during the second model, the first model's
    row is on disk, and the same command measures only what the file lacks (the kept row is the written one,
    not a new timing)."""
    import harness.cost.bench as cost_bench

    out = tmp_path / "bench.json"
    args = ["bench", "--suite", "DiT-2x32x2/4,DiT-2x32x2/2", "--batch", "4", "--steps", "1", "--warmup", "1",
            "--input-size", "8", "--in-channels", "1", "--out", str(out)]
    real = cost_bench.bench

    def cut_at_second(name, **kw):
        if name == "DiT-2x32x2/2":
            raise KeyboardInterrupt   # what a job's time limit does to the process, as far as the file can tell
        return real(name, **kw)

    monkeypatch.setattr(cost_bench, "bench", cut_at_second)
    assert main(args) == 130
    first = json.loads(out.read_text())
    assert [r["model"] for r in first["results"]] == ["DiT-2x32x2/4"]
    assert "DiT-2x32x2/4" in (tmp_path / "bench.md").read_text()

    measured = []
    monkeypatch.setattr(cost_bench, "bench", lambda name, **kw: measured.append(name) or real(name, **kw))
    assert main(args) == 0
    capsys.readouterr()
    both = json.loads(out.read_text())
    assert measured == ["DiT-2x32x2/2"]
    assert [r["model"] for r in both["results"]] == ["DiT-2x32x2/4", "DiT-2x32x2/2"]
    assert both["results"][0] == first["results"][0] and both["settings"] == first["settings"]
    assert main(args) == 0 and measured == ["DiT-2x32x2/2"]     # complete: nothing measured again
    capsys.readouterr()

    # other settings: refused in one line naming the file and the setting; the file untouched
    before = out.read_bytes()
    assert main([a if a != "4" else "2" for a in args]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "batch = 4" in err and "Fix:" in err and "Traceback" not in err
    assert out.read_bytes() == before


def test_recomputation_is_tried_only_where_micro_batches_underfill_the_device():
    """The rule in harness/cost/bench.py's doc: on CUDA, where the defaults failed or split the batch into
    micro-batches of fewer than EFFICIENT_TOKENS_PER_GPU tokens (DiT-XL/2: 256 tokens an image)."""
    from dataclasses import fields, replace

    from harness.cost.bench import worth_recomputing
    from harness.cost.schedule import EFFICIENT_TOKENS_PER_GPU
    from harness.training.bench import BenchResult

    base = BenchResult(**{f.name: 0 for f in fields(BenchResult)})
    xl2 = replace(base, model="DiT-XL/2", input_size=32, batch=256, error=None)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    edge = EFFICIENT_TOKENS_PER_GPU // 256                     # micro-batch at exactly the threshold
    assert not worth_recomputing(replace(xl2, micro_batch=256), cuda)          # the whole batch fits
    assert not worth_recomputing(replace(xl2, micro_batch=edge), cuda)
    assert worth_recomputing(replace(xl2, micro_batch=edge // 2), cuda)
    assert worth_recomputing(replace(xl2, micro_batch=0, error="out of memory"), cuda)
    assert not worth_recomputing(replace(xl2, micro_batch=edge // 2), cpu)     # no recomputation on the CPU
    xl8 = replace(xl2, model="DiT-XL/8")                                     # 16 tokens an image
    assert worth_recomputing(replace(xl8, micro_batch=128), cuda)


def test_paper_suite_measures_the_largest_models_first():
    from harness.config.registry import VARIANTS
    from harness.cost.bench import paper_models
    from harness.paper import paper_gflops

    order = paper_models()
    assert sorted(order) == sorted(VARIANTS) and len(order) == 12
    assert order[0] == "DiT-XL/2" and order[-1] == "DiT-S/8"
    assert all(paper_gflops(a) >= paper_gflops(b) for a, b in zip(order, order[1:]))


def test_suite_with_evaluation_times_it_instead_of_the_training_forward(tmp_path, capsys):
    """--sampling-steps: each model's evaluation end to end is in the file and the table, the training row skips
    its own sampling-forward graph (0), and the plan's reader takes the evaluation's figures; a file cut before a
    model's evaluation is refused by the reader, naming the model and the fix."""
    from harness.cost.bench import read_throughput

    out = tmp_path / "bench.json"
    assert main(["bench", "--suite", "DiT-2x32x2/4", "--batch", "4", "--steps", "1", "--warmup", "1",
                 "--input-size", "8", "--in-channels", "1", "--sampling-steps", "250", "--eval-samples", "8",
                 "--eval-batch", "4", "--eval-features", "digits", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    (row,) = data["results"]
    ev = row["eval"]
    assert row["sample_forward_per_s"] == 0.0 and ev["sampling_steps"] == 250 and ev["batch"] == 4
    assert f"{ev['images_per_s']:.2f} images/s at 250 steps" in table
    assert read_throughput(out) == {"DiT-2x32x2/4": (row["train_images_per_s"], ev["forward_images_per_s"],
                                                      ev["fixed_s_per_batch"] / 4)}
    row["eval"] = None
    out.write_text(json.dumps(data))
    with pytest.raises(HarnessError, match=r"DiT-2x32x2/4 has no sampling measurement.*Fix: run the same"):
        read_throughput(out)


def test_the_suite_file_names_a_cuda_device_by_its_cuda_name(monkeypatch):
    """The name a suite file is matched by on a GPU (CUDA's own device name), checked here without one."""
    from harness.training.bench import device_name

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert device_name(torch.device("cuda")) == "NVIDIA H200"
    assert device_name(torch.device("cpu")) == f"cpu ({torch.get_num_threads()} threads)"
