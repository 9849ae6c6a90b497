"""`harness plan`: per-run Gflops, params and compute, totals, accelerator-hours."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli, paper
from harness.errors import HarnessError
from harness.models.flops import model_gflops
from harness.cost.plan import format_table, plan_sweep
from harness.config.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "sweeps"

SPEC = """\
name: p
models: [DiT-2x32x2/4, DiT-2x32x2/2]
data: {dataset: digits, image_size: 8}
train: {steps: 30, global_batch: 16}
eval:
  at_steps: [10, 30]
  num_samples: 20
  sampling_steps: [5, 10]
  cfg_scales: [1.0, 1.5]
"""


def test_plan_arithmetic(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(SPEC)
    plan = plan_sweep(load_spec(path), throughput=100.0)
    assert [r["model"] for r in plan["runs"]] == ["DiT-2x32x2/4", "DiT-2x32x2/2"]
    for r in plan["runs"]:
        g, params = model_gflops(r["model"], "adaLN-Zero", 8, 1, 10)
        assert r["gflops"] == g and r["params"] == params and g > 0
        assert r["train_gflops"] == pytest.approx(g * 16 * 30 * 3)
        # 2 eval steps x (5 + 10 sampling steps) x (1 + 2 for cfg 1.5) x 20 samples
        assert r["sampling_forwards"] == 2 * (5 + 10) * 3 * 20
        assert r["sampling_gflops"] == pytest.approx(g * r["sampling_forwards"])
        assert r["eval_points"] == 2 * 2 * 2 and r["eval_samples"] == 8 * 20
        assert r["train_accel_hours"] == pytest.approx(16 * 30 / 100.0 / 3600)
        assert r["paper_gflops"] is None  # pixel-space digits: no paper row
    # a patch of 2 sees 4x the tokens of a patch of 4: more compute
    assert plan["runs"][1]["gflops"] > plan["runs"][0]["gflops"]
    t = plan["totals"]
    assert t["runs"] == 2 and t["train_gflops"] == pytest.approx(sum(r["train_gflops"] for r in plan["runs"]))
    assert t["accel_hours"] == pytest.approx(t["train_accel_hours"] + t["sampling_accel_hours"])
    table = format_table(plan)
    assert "total (2 runs)" in table and plan["runs"][0]["run_id"] in table and "train_h" in table


def test_throughput_model_scales_by_gflops(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(SPEC)
    spec = load_spec(path)
    plan = plan_sweep(spec, throughput=100.0, throughput_model="DiT-2x32x2/2")
    small, big = plan["runs"]
    assert big["train_accel_hours"] == pytest.approx(16 * 30 / 100.0 / 3600)  # measured on this one
    assert small["train_accel_hours"] == pytest.approx(big["train_accel_hours"] * small["gflops"] / big["gflops"])
    with pytest.raises(HarnessError, match="--throughput"):
        plan_sweep(spec, throughput=0.0)


def test_checkpoints_from_sweep_trains_nothing(tmp_path):
    (tmp_path / "src.yaml").write_text(SPEC.replace("name: p", "name: src"))
    path = tmp_path / "s.yaml"
    path.write_text(SPEC.replace("name: p", "name: s\ncheckpoints_from: src"))
    plan = plan_sweep(load_spec(path))
    assert plan["checkpoints_from"] == "src" and plan["totals"]["train_gflops"] == 0
    assert plan["totals"]["sampling_gflops"] > 0 and plan["runs"][0]["train_accel_hours"] == 0.0
    assert plan["runs"][0]["sampling_accel_hours"] > 0  # hours by default, from the packaged table
    assert plan_sweep(load_spec(path), gpu=None)["runs"][0]["sampling_accel_hours"] is None


def test_hours_without_flags_come_from_the_packaged_table_measured_or_scaled_by_gflops():
    """Hand-computed: a measured model takes its own figures; another takes the nearest measured model's
    (log Gflops), scaled by Gflops; evaluation the measured evaluation path's, scaled the same way."""
    from harness import hardware

    plan = plan_sweep(load_spec(SWEEPS / "gflops.yaml"), gpu="h100")
    rows = {m.model: m for m in hardware.measured("h100")}
    runs = {r["model"]: r for r in plan["runs"]}
    g = {m: runs[m]["gflops"] for m in runs}
    xl2 = runs["DiT-XL/2"]
    assert xl2["train_accel_hours"] == pytest.approx(256 * 400_000 / rows["DiT-XL/2"].train_images_per_s / 3600,
                                                     rel=1e-12)
    assert xl2["sampling_accel_hours"] == pytest.approx(
        xl2["sampling_forwards"] / rows["DiT-XL/2"].sample_images_per_s_one_step / 3600, rel=1e-12)
    s4 = runs["DiT-S/4"]  # 1.42 Gflops: nearest measured is S/2 (6.07) on a log scale
    assert s4["train_accel_hours"] == pytest.approx(
        256 * 400_000 / (rows["DiT-S/2"].train_images_per_s * g["DiT-S/2"] / g["DiT-S/4"]) / 3600, rel=1e-9)
    assert s4["sampling_accel_hours"] == pytest.approx(
        s4["sampling_forwards"] / (rows["DiT-XL/2"].sample_images_per_s_one_step * g["DiT-XL/2"] / g["DiT-S/4"])
        / 3600, rel=1e-9)
    assert plan["table"]["measured"] == sorted(rows) and "DiT-S/4" in plan["table"]["scaled_by_gflops"]
    t = plan["totals"]
    assert t["accel_hours"] == pytest.approx(t["train_accel_hours"] + t["sampling_accel_hours"], rel=1e-12)


def test_the_table_flags_evaluation_above_a_third_and_says_how_to_cut_it():
    heavy = plan_sweep(load_spec(SWEEPS / "gflops.yaml"))  # eight FID-50K evaluations of DDPM-250 per run
    text = format_table(heavy)
    t = heavy["totals"]
    assert t["sampling_accel_hours"] > t["accel_hours"] / 3
    assert f"note: evaluation is {t['sampling_accel_hours'] / t['accel_hours']:.0%} of the accelerator-hours" in text
    assert "FID-10K at intermediate steps" in text
    light = plan_sweep(load_spec(SWEEPS / "gflops.yaml", ["eval.at_steps=[400000]", "eval.num_samples=10000"]))
    assert light["totals"]["sampling_accel_hours"] < light["totals"]["accel_hours"] / 3
    assert "note: evaluation is" not in format_table(light)


def test_an_unknown_gpu_kind_is_one_line_naming_the_kinds_there_are():
    with pytest.raises(HarnessError, match=r"--gpu a100: no packaged throughputs for this GPU kind \(have: h100, h200\)"):
        plan_sweep(load_spec(SWEEPS / "smoke.yaml"), gpu="a100")


def test_cli_plan_json_smoke(capsys):
    assert cli.main(["plan", str(SWEEPS / "smoke.yaml"), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["sweep"] == "smoke" and len(plan["runs"]) == 2
    assert plan["totals"]["eval_samples"] == 2 * 2 * 100


def test_cli_plan_subprocess_table():
    exe = Path(sys.executable).with_name("harness")
    proc = subprocess.run([str(exe), "plan", str(SWEEPS / "smoke.yaml"), "--throughput", "50"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "total (2 runs)" in proc.stdout and "accelerator-hours" in proc.stdout


@pytest.mark.slow
def test_plan_gflops_sweep_matches_paper():
    """The 12 paper models: Gflops within 1% of Table 4, XL/2 training ~ 118.6 x 256 x 400K x 3.
    Slow only with a cold flops cache (fvcore traces each model once, then it is cached)."""
    plan = plan_sweep(load_spec(SWEEPS / "gflops.yaml"))
    assert len(plan["runs"]) == 12
    for r in plan["runs"]:
        ref = paper.paper_gflops(r["model"], "adaLN-Zero", 256)
        assert r["paper_gflops"] == ref
        assert r["gflops"] == pytest.approx(ref, rel=0.01), r["model"]
        assert r["train_gflops"] == pytest.approx(r["gflops"] * 256 * 400_000 * 3)
    xl2 = next(r for r in plan["runs"] if r["model"] == "DiT-XL/2")
    assert xl2["train_gflops"] == pytest.approx(3.64e10, rel=0.01)
    assert plan["totals"]["train_gflops"] == pytest.approx(sum(r["train_gflops"] for r in plan["runs"]))


def test_plan_shows_forecast_fid_from_a_smaller_sweep(tmp_path, capsys):
    """--forecast-from: each planned run gets the chosen law's FID (fitted to the recorded sweep) with
    its interval, and the table names the law, the source sweep and its feature space."""
    import json

    import numpy as np

    from harness.study import forecast
    from harness.cli import main
    from harness.study.results import load_sweep
    from report_synth import write_scaling_sweep

    write_scaling_sweep(tmp_path)
    assert main(["plan", "sweeps/smoke.yaml", "--forecast-from", "scaling", "--results", str(tmp_path),
                 "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["forecast_from"]["sweep"] == "scaling" and plan["forecast_from"]["feature_space"] == "digits"
    points, _ = forecast.sweep_points(load_sweep(tmp_path, "scaling").frame)
    fit = forecast.forecast_next(points)["fit"]
    for r in plan["runs"]:
        want = fit.predict({"compute": np.array([r["gflops"]]), "params": np.array([float(r["params"])]),
                            "tokens": np.array([float(r["tokens"])])})[0]
        assert r["forecast_fid"] == pytest.approx(want) and r["forecast_lo"] <= r["forecast_hi"]
    assert main(["plan", "sweeps/smoke.yaml", "--forecast-from", "scaling", "--results", str(tmp_path)]) == 0
    assert "fitted to sweep 'scaling'" in capsys.readouterr().out


def test_plan_evaluation_and_latent_hours_from_measured_throughput(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(SPEC)
    plan = plan_sweep(load_spec(path), throughput=100.0, sampling_throughput=400.0, latent_throughput=50.0)
    for r in plan["runs"]:
        assert r["sampling_accel_hours"] == pytest.approx(r["sampling_forwards"] / 400.0 / 3600)
        assert r["latent_images"] == 1797 and r["latent_accel_hours"] == 0.0  # identity: nothing to encode
    vae = tmp_path / "vae.yaml"
    vae.write_text(SPEC.replace("data: {dataset: digits, image_size: 8}",
                                "data: {dataset: imagefolder, path: '${NOWHERE_PLAN_TEST}', image_size: 256, "
                                "autoencoder: sd-vae-ft-ema, num_classes: 1000}"))
    plan = plan_sweep(load_spec(vae), throughput=100.0, latent_throughput=50.0)
    shares = [r["latent_accel_hours"] for r in plan["runs"]]
    # ImageNet-1k's count (the folder is not reachable here), image and flip, shared by the 2 runs
    assert shares[0] == shares[1] == pytest.approx(2 * 1_281_167 / 50.0 / 3600 / 2)
    t = plan["totals"]
    assert t["latent_accel_hours"] == pytest.approx(sum(shares))
    assert t["accel_hours"] == pytest.approx(t["train_accel_hours"] + t["sampling_accel_hours"] + sum(shares))
    assert "latent_h" in format_table(plan) and "eval_h" in format_table(plan)
    with pytest.raises(HarnessError, match="--sampling-throughput: needs --throughput"):
        plan_sweep(load_spec(path), sampling_throughput=400.0)


def test_evaluation_hours_add_the_per_image_decode_and_features_unscaled_by_gflops(tmp_path):
    """H200's row measures evaluation end to end: network calls (scaled by Gflops for other models) plus
    noise, decode and features per image (the same for every model); a bench JSON's eval stage likewise."""
    from harness import hardware
    from harness.cost.bench import read_throughput

    rows = {m.model: m for m in hardware.measured("h200")}
    xl2 = rows["DiT-XL/2"]
    assert xl2.eval_ms_per_image and xl2.sample_images_per_s_one_step
    plan = plan_sweep(load_spec(SWEEPS / "gflops.yaml"), gpu="h200")
    runs = {r["model"]: r for r in plan["runs"]}
    g = {m: runs[m]["gflops"] for m in runs}
    for model in ("DiT-XL/2", "DiT-S/8"):
        r = runs[model]
        network = r["sampling_forwards"] / (xl2.sample_images_per_s_one_step * g["DiT-XL/2"] / g[model])
        assert r["sampling_accel_hours"] == pytest.approx(
            (network + r["eval_samples"] * xl2.eval_ms_per_image / 1e3) / 3600, rel=1e-9)
    assert runs["DiT-S/8"]["sampling_accel_hours"] > 0.5   # 400K decoded images: not ~0 as Gflops alone would say

    from dataclasses import fields

    from harness.training.bench import BenchResult

    row = {f.name: 0 for f in fields(BenchResult)}
    row.update(model="DiT-S/2", train_images_per_s=100.0, sample_images_per_s_one_step=7.0, error=None,
               eval={"forward_images_per_s": 300.0, "fixed_s_per_batch": 2.0, "batch": 8})
    bench = {"results": [row]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    assert read_throughput(path) == {"DiT-S/2": (100.0, 300.0, 0.25)}
    bench["results"][0]["eval"] = None
    path.write_text(json.dumps(bench))
    assert read_throughput(path) == {"DiT-S/2": (100.0, 7.0, 0.0)}   # no eval stage: the training forward


def test_disk_of_the_gflops_sweep_by_hand():
    """Checkpoints: 9 kept (the 8 evaluated steps and, ckpt_every_minutes being on, a timed one that can be among
    the newest keep_last = 2 with step 400K): those 2 whole, 16 bytes a parameter (weights, EMA, two Adam
    moments), the 7 evaluated steps before them slim, 8 bytes (weights, EMA); npz: 50,000 x (256 x 256 x 3 + 8)
    bytes per kept setting; FID features: 50,000 x 2,048 float16 per setting at every evaluated step; latents:
    ImageNet's 1,281,167 images x 2 flips x 4 x 32 x 32 float16."""
    for keep, kept_steps in (("last", 1), ("all", 8), ("none", 0)):
        plan = plan_sweep(load_spec(SWEEPS / "gflops.yaml", [f"eval.keep_samples={keep}"]))
        d, params = plan["disk"], sum(r["params"] for r in plan["runs"])
        assert d["checkpoints_gb"] == pytest.approx((16 * 2 + 8 * 7) * params / 1e9, rel=1e-12)
        assert d["samples_gb"] == pytest.approx(12 * kept_steps * 50_000 * (256 * 256 * 3 + 8) / 1e9, rel=1e-12)
        assert d["features_gb"] == pytest.approx(12 * 8 * 50_000 * 2048 * 2 / 1e9, rel=1e-12)   # 205 MB each
        assert d["latents_gb"] == pytest.approx(1_281_167 * 2 * 4 * 32 * 32 * 2 / 1e9, rel=1e-12)
        assert d["total_gb"] == pytest.approx(d["checkpoints_gb"] + d["samples_gb"] + d["features_gb"]
                                              + d["latents_gb"], rel=1e-12)

    def ckpts(*overrides):
        gb = plan_sweep(load_spec(SWEEPS / "gflops.yaml", list(overrides)))["disk"]["checkpoints_gb"]
        return gb * 1e9 / params  # bytes a parameter, over the runs

    assert ckpts("train.keep_optimizer=all") == pytest.approx(16 * 9, rel=1e-12)  # nothing slim: all 9 whole
    # no timed checkpoints: the newest 2 are the evaluated 350K and 400K, whole; the 6 before them slim
    assert ckpts("train.ckpt_every_minutes=0") == pytest.approx(16 * 2 + 8 * 6, rel=1e-12)
    assert ckpts("train.ckpt_every_minutes=0", "train.keep_optimizer=all") == pytest.approx(16 * 8, rel=1e-12)
    # every 10,000 steps, 40 saved: the newest 2 (390K, 400K) and the 7 evaluated before them; with timed
    # checkpoints, 400K and a timed one and the same 7
    assert ckpts("train.ckpt_every=10000", "train.ckpt_every_minutes=0") == pytest.approx(16 * 2 + 8 * 7, rel=1e-12)
    assert ckpts("train.ckpt_every=10000") == pytest.approx(16 * 2 + 8 * 7, rel=1e-12)
    # keep_last 4: 400K and 3 timed ones whole, and the 7 evaluated before them
    assert ckpts("train.keep_last=4") == pytest.approx(16 * 4 + 8 * 7, rel=1e-12)
    assert "disk (at most, at the end): checkpoints" in format_table(plan)
