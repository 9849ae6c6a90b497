"""The sweep spec: shipped sweeps load, runs and ids are stable, and malformed specs fail clearly."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness import cli, paper
from harness.errors import HarnessError
from harness.config.spec import RECORD_KEYS, DataSpec, EvalSpec, RunSpec, TrainSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "sweeps"

GOOD = """\
name: t
models: [DiT-2x32x2/4]
data:
  dataset: digits
  image_size: 8
train:
  steps: 30
  global_batch: 8
eval:
  at_steps: [15, 30]
  num_samples: 10
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------- shipped sweeps
def test_shipped_sweeps_load():
    gflops = load_spec(SWEEPS / "gflops.yaml")
    table = [r for r in paper.table4() if r["train_steps"] == 400000 and r["conditioning"] == "adaLN-Zero"]
    assert sorted(gflops.models) == sorted(r["model"] for r in table)
    assert (gflops.train.steps, gflops.train.global_batch, gflops.train.lr) == (400000, 256, 1e-4)
    assert gflops.data.autoencoder == "sd-vae-ft-ema" and gflops.data.input_size == 32
    assert gflops.eval.at_steps == list(range(50000, 400001, 50000)) and gflops.eval.num_samples == 50000
    assert gflops.launcher.kind == "slurm" and gflops.launcher.gpus_per_node == 8

    cond = load_spec(SWEEPS / "conditioning.yaml")
    assert [r.conditioning for r in cond.expand()] == ["in-context", "cross-attention", "adaLN", "adaLN-Zero"]

    sampling = load_spec(SWEEPS / "sampling.yaml")
    assert sampling.checkpoints_from == "gflops"
    assert sampling.eval.sampling_steps == [16, 32, 64, 128, 256, 1000] and sampling.eval.num_samples == 10000
    # the sampling sweep's runs are the gflops sweep's runs (same ids), evaluated differently
    assert [r.run_id for r in sampling.expand()] == [r.run_id for r in gflops.expand()]

    smoke = load_spec(SWEEPS / "smoke.yaml")
    assert len(smoke.expand()) == 2 and smoke.launcher.kind == "local"
    # the ImageNet sweeps keep the last step's npz files (9.8 GB each at FID-50K); the small ones every file
    assert [s.eval.keep_samples for s in (gflops, cond, sampling)] == ["last"] * 3
    assert smoke.eval.keep_samples == load_spec(SWEEPS / "mini.yaml").eval.keep_samples == "all"


def test_expand_grid_order_and_ids(tmp_path):
    spec = load_spec(write(tmp_path, GOOD.replace("models: [DiT-2x32x2/4]",
                                                  "models: {sizes: [S, B], patches: [8, 4]}\n"
                                                  "conditioning: [adaLN, adaLN-Zero]\nseeds: [0, 1]")))
    runs = spec.expand()
    assert len(runs) == 2 * 2 * 2 * 2
    assert [r.model for r in runs[::4]] == ["DiT-S/8", "DiT-S/4", "DiT-B/8", "DiT-B/4"]
    assert runs[0].run_id.startswith("DiT-S-8_adaLN_s0_") and "/" not in runs[0].run_id
    assert len({r.run_id for r in runs}) == len(runs)


def test_run_id_stable_under_launcher_eval_and_bookkeeping(tmp_path):
    base = load_spec(write(tmp_path, GOOD, "a.yaml")).expand()[0].run_id
    same = GOOD + "launcher:\n  kind: slurm\n  partition: gpu\n"
    same = same.replace("num_samples: 10", "num_samples: 99\n  keep_samples: none").replace("global_batch: 8",
                                                                     "global_batch: 8\n  ckpt_every: 7\n  compile: true")
    assert load_spec(write(tmp_path, same, "b.yaml")).expand()[0].run_id == base
    assert load_spec(write(tmp_path, GOOD, "c.yaml")).expand()[0].run_id == base  # deterministic
    # 1e-4 and 0.0001 are the same lr; a different lr is a different run
    lr_a = load_spec(write(tmp_path, GOOD.replace("global_batch: 8", "global_batch: 8\n  lr: 1e-4"), "d.yaml"))
    lr_b = load_spec(write(tmp_path, GOOD.replace("global_batch: 8", "global_batch: 8\n  lr: 0.0001"), "e.yaml"))
    lr_c = load_spec(write(tmp_path, GOOD.replace("global_batch: 8", "global_batch: 8\n  lr: 2.0e-4"), "f.yaml"))
    assert lr_a.train.lr == 1e-4 and lr_a.expand()[0].run_id == lr_b.expand()[0].run_id == base
    assert lr_c.expand()[0].run_id != base


def test_ablation_adds_blocks_on_chosen_models_only(tmp_path):
    spec = load_spec(write(tmp_path, GOOD.replace("[DiT-2x32x2/4]", "[DiT-2x32x2/4, DiT-2x32x2/2]")
                           + "ablation: {models: [DiT-2x32x2/2], conditioning: [in-context, adaLN-Zero, adaLN]}\n"))
    pairs = [(r.model, r.conditioning) for r in spec.expand()]
    assert pairs == [("DiT-2x32x2/4", "adaLN-Zero"), ("DiT-2x32x2/2", "adaLN-Zero"),
                     ("DiT-2x32x2/2", "in-context"), ("DiT-2x32x2/2", "adaLN")]
    assert len({r.run_id for r in spec.expand()}) == 4


def test_runspec_round_trip(tmp_path):
    run = load_spec(SWEEPS / "gflops.yaml").expand()[-1]
    d = run.to_dict()
    assert RunSpec.from_dict(d) == run
    assert RunSpec.from_dict({**d, "gflops": 118.6, "params": 1, "depth": 28}) == run  # planner keys ok
    for bad, says in (({**d, "bogus": 1}, "unknown keys ['bogus']"), ({"run_id": "x"}, "malformed run record (")):
        with pytest.raises(HarnessError) as err:
            RunSpec.from_dict(bad, tmp_path / "job" / "run.json")
        assert str(err.value).startswith(f"{tmp_path / 'job' / 'run.json'}: {says}")


def test_a_partial_run_record_takes_the_spec_defaults(tmp_path):
    """A checkpoint's run record needs only its model (required=("model",)); whatever else it lacks, as a
    record written before a key existed would, takes the dataclasses' defaults. run.json needs its identity."""
    run = RunSpec.from_dict({"model": "DiT-2x32x2/2", "data": {"image_size": 16}}, required=("model",))
    assert (run.run_id, run.sweep, run.model, run.conditioning, run.seed) == ("?", "?", "DiT-2x32x2/2", "adaLN-Zero", 0)
    assert run.data == DataSpec(image_size=16) and run.data.dataset == "digits" and run.data.autoencoder == "identity"
    assert run.train == TrainSpec() and run.train.class_dropout == 0.1 and run.eval == EvalSpec()
    assert RunSpec.from_dict({"model": "DiT-2x32x2/2", "data": None}, required=("model",)).data == DataSpec()
    d = load_spec(SWEEPS / "gflops.yaml").expand()[0].to_dict()
    del d["data"]["flip"], d["train"]["grad_checkpointing"], d["checkpoints_from"]  # keys added after it was written
    assert RunSpec.from_dict(d) == load_spec(SWEEPS / "gflops.yaml").expand()[0]
    for required, record in ((("model",), {"data": {}}), (RECORD_KEYS, {k: v for k, v in d.items() if k != "eval"})):
        with pytest.raises(HarnessError) as err:
            RunSpec.from_dict(record, tmp_path / "r.json", required=required)
        assert str(err.value).startswith(f"{tmp_path / 'r.json'}: malformed run record (")


def test_at_steps_default_to_final_step(tmp_path):
    spec = load_spec(write(tmp_path, "models: [DiT-2x32x2/4]\ntrain: {steps: 40}\n"))
    assert spec.name == "spec" and spec.eval.at_steps == [40]


# --------------------------------------------------------------------------- malformed specs
# (id, YAML text, substrings the message must contain, line number or None)
BAD = [
    ("typo-top", GOOD.replace("models:", "modles:"), ["modles", "did you mean 'models'"], 2),
    ("typo-train", GOOD.replace("steps: 30", "stpes: 30"), ["train.stpes", "did you mean 'steps'"], 7),
    ("typo-launcher", GOOD + "launcher:\n  gpu_per_node: 8\n", ["launcher.gpu_per_node", "gpus_per_node"], 13),
    ("unknown-key", GOOD + "colour: blue\n", ["colour", "remove it"], 12),
    ("steps-str", GOOD.replace("steps: 30", "steps: many"), ["train.steps", "expected an integer"], 7),
    ("lr-str", GOOD.replace("global_batch: 8", "global_batch: 8\n  lr: fast"), ["train.lr", "expected a number"], 9),
    ("bool", GOOD.replace("global_batch: 8", "global_batch: 8\n  compile: maybe"), ["train.compile", "true or false"], 9),
    ("model", GOOD.replace("DiT-2x32x2/4", "DiT-XXL/2"), ["models[0]", "did you mean 'DiT-XL/2'"], 2),
    ("block", GOOD + "conditioning: [adaLN-zero]\n", ["conditioning[0]", "did you mean 'adaLN-Zero'"], 12),
    ("patch", GOOD.replace("DiT-2x32x2/4", "DiT-2x32x2/3"), ["models[0]", "patch size 3 does not divide"], 2),
    ("heads", GOOD.replace("DiT-2x32x2/4", "DiT-2x36x8/2"), ["models[0]", "not divisible by 8 heads"], 2),
    ("vae-size", GOOD.replace("image_size: 8", "image_size: 100\n  autoencoder: sd-vae-ft-ema"),
     ["data.image_size", "multiple of 8"], 5),
    ("empty-models", GOOD.replace("[DiT-2x32x2/4]", "[]"), ["models", "empty list"], 2),
    ("empty-seeds", GOOD + "seeds: []\n", ["seeds", "empty list"], 12),
    ("zero-batch", GOOD.replace("global_batch: 8", "global_batch: 0"), ["train.global_batch", ">= 1"], 8),
    ("neg-seed", GOOD + "seeds: [-1]\n", ["seeds[0]", ">= 0"], 12),
    ("zero-samples", GOOD.replace("num_samples: 10", "num_samples: 0"), ["eval.num_samples", ">= 1"], 11),
    ("duplicate", GOOD.replace("steps: 30", "steps: 30\n  steps: 40"), ["train.steps", "duplicate key", "line 7"], 8),
    ("dup-top", GOOD + "models: [DiT-S/2]\n", ["models", "duplicate key"], 12),
    ("empty-file", "", ["empty"], None),
    ("comments-only", "# nothing here\n", ["empty"], None),
    ("not-yaml", "models: [DiT-S/2\ntrain: {steps: 3\n", ["not valid YAML"], None),
    ("tab", "models:\n\t- DiT-S/2\n", ["not valid YAML"], 2),
    ("list-top", "- DiT-S/2\n- DiT-B/2\n", ["must be a mapping"], 1),
    ("scalar-top", "hello\n", ["must be a mapping"], 1),
    ("at-steps", GOOD.replace("[15, 30]", "[15, 300]"), ["eval.at_steps[1]", "beyond train.steps 30"], 10),
    ("at-steps-order", GOOD.replace("[15, 30]", "[30, 15]"), ["eval.at_steps", "increasing"], 10),
    ("sampler", GOOD + "  sampler: ddmp\n", ["eval.sampler", "did you mean 'ddpm'"], 12),
    ("metric", GOOD + "  metrics: [fid50k]\n", ["eval.metrics[0]", "fid"], 12),
    ("grid-size", GOOD.replace("[DiT-2x32x2/4]", "{sizes: [XXL], patches: [2]}"), ["models.sizes[0]", "XL"], 2),
    ("grid-missing", GOOD.replace("[DiT-2x32x2/4]", "{sizes: [S]}"), ["models", "patches"], 2),
    ("section-type", GOOD.replace("data:\n  dataset: digits\n  image_size: 8\n", "data: digits\n"),
     ["data", "expected a mapping"], 3),
    ("batch-gpus", GOOD + "launcher:\n  gpus_per_node: 3\n", ["train.global_batch", "multiple of 3"], 8),
    ("micro-batch", GOOD.replace("global_batch: 8", "global_batch: 8\n  micro_batch: 3") + "launcher:\n  gpus_per_node: 2\n",
     ["train.micro_batch", "per-GPU batch of 4 (train.global_batch / GPUs)", "use one of [1, 2, 4], or auto"], 9),
    ("folder-path", GOOD.replace("dataset: digits", "dataset: imagefolder"), ["data.path", "needs a path"], 3),
    ("name", GOOD.replace("name: t", "name: a/b"), ["name", "folder name"], 1),
    ("cfg", GOOD + "  cfg_scales: [0.5]\n", ["eval.cfg_scales[0]", ">= 1.0"], 12),
    ("dup-model", GOOD.replace("[DiT-2x32x2/4]", "[DiT-2x32x2/4, DiT-2x32x2/4]"), ["models[1]", "twice"], 2),
    ("guidance", GOOD + "  guidance_channels: 2\n", ["eval.guidance_channels", "all"], 12),
    ("missing-models", "name: t\n", ["models", "add e.g."], None),
    ("null-steps", GOOD.replace("steps: 30", "steps:"), ["train.steps", "null"], 7),
    ("ema", GOOD.replace("global_batch: 8", "global_batch: 8\n  ema_decay: 1.5"), ["train.ema_decay", "< 1.0"], 9),
    ("ablation-model", GOOD + "ablation: {models: [DiT-S/2], conditioning: [adaLN]}\n",
     ["ablation.models[0]", "not one of this sweep's models"], 12),
    ("ablation-block", GOOD + "ablation: {models: [DiT-2x32x2/4], conditioning: [adaln]}\n",
     ["ablation.conditioning[0]", "adaLN"], 12),
    ("ablation-missing", GOOD + "ablation: {models: [DiT-2x32x2/4]}\n", ["ablation", "needs `conditioning`"], 12),
]


@pytest.mark.parametrize("case,text,needles,line", BAD, ids=[b[0] for b in BAD])
def test_malformed_spec_error(tmp_path, case, text, needles, line):
    path = write(tmp_path, text)
    with pytest.raises(HarnessError) as info:
        load_spec(path)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    if line is not None:
        assert msg.startswith(f"{path}:{line}:"), msg
    for needle in needles:
        assert needle in msg, msg
    assert "Fix:" in msg and len(msg) < 400 + len(str(path)), msg


def test_checkpoints_from_must_match_source(tmp_path):
    write(tmp_path, GOOD.replace("name: t", "name: src"), "src.yaml")
    ok = GOOD.replace("name: t", "name: s\ncheckpoints_from: src").replace("num_samples: 10", "num_samples: 50")
    assert load_spec(write(tmp_path, ok, "s.yaml")).checkpoints_from == "src"
    bad = ok.replace("global_batch: 8", "global_batch: 16")
    with pytest.raises(HarnessError, match=r"s2.yaml:2: checkpoints_from: run .* is not in .*src.yaml"):
        load_spec(write(tmp_path, bad, "s2.yaml"))


def test_missing_file(tmp_path):
    with pytest.raises(HarnessError, match="no such sweep spec"):
        load_spec(tmp_path / "nope.yaml")


def test_cli_plan_bad_spec_in_process(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("steps: 30", "stpes: 30"))
    assert cli.main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:7: train.stpes") and "Traceback" not in err


@pytest.mark.parametrize("text", [GOOD.replace("models:", "modles:"), "models: [DiT-S/2\n"])
def test_cli_plan_bad_spec_subprocess(tmp_path, text):
    """The real console script: non-zero exit, one-line error, no traceback."""
    path = write(tmp_path, text)
    exe = Path(sys.executable).with_name("harness")
    proc = subprocess.run([str(exe), "plan", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith(f"error: {path}")
    assert proc.stdout == ""


# --------------------------------------------------------------------------- hostile files (issue 14)
def _laughs(levels: int = 9) -> str:
    """Nine anchors, each a list of nine aliases of the previous one: 9^9 values once expanded."""
    lines = ["name: bomb", "a0: &a0 [DiT-S/2, DiT-S/2, DiT-S/2, DiT-S/2, DiT-S/2, DiT-S/2, DiT-S/2, DiT-S/2, DiT-S/2]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines + [f"models: *a{levels - 1}"]) + "\n"


HOSTILE = {
    "alias expansion": (_laughs(), "values (aliases *name expanded)"),
    "alias cycle": ("name: cyc\nmodels: &m [DiT-S/2, *m]\n", "a cycle"),
    "deep nesting": ("name: deep\nmodels: " + "[" * 20000 + "]" * 20000 + "\n", "nesting deeper than"),
    "nesting": ("name: deep\nmodels: " + "[" * 100 + "]" * 100 + "\n", "nesting deeper than"),
    "size": ("name: big\nmodels: [DiT-S/2]\n" + "# padding\n" * 20000, "byte limit of a sweep spec"),
    "values": ("name: many\nmodels: [DiT-S/2]\nseeds: [" + ", ".join(["0"] * 12000) + "]\n", "values (aliases *name expanded)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_yaml_is_refused_fast_with_one_line(tmp_path, case):
    """Refused before anything is expanded: well under the 2 s the issue allows (ms in practice),
    exit 2, one line, no traceback, from the real console script."""
    text, needle = HOSTILE[case]
    path = write(tmp_path, text)
    t0 = time.perf_counter()
    with pytest.raises(HarnessError, match=re.escape(needle)):
        load_spec(path)
    assert time.perf_counter() - t0 < 2.0  # the bound: a guard against hanging, not a benchmark
    exe = Path(sys.executable).with_name("harness")
    proc = subprocess.run([str(exe), "plan", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {path}") and proc.stderr.count("\n") == 1 and needle in proc.stderr


def test_anchors_within_the_bounds_still_load(tmp_path):
    path = write(tmp_path, "name: t\nmodels: &m [DiT-2x32x2/4, DiT-2x32x2/2]\nablation: {models: *m, conditioning: [adaLN]}\n")
    spec = load_spec(path)
    assert spec.ablation_models == ["DiT-2x32x2/4", "DiT-2x32x2/2"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["report", "status"])
def test_hostile_yaml_refused_by_every_command_that_reads_a_spec(tmp_path, command):
    path = write(tmp_path, _laughs())
    exe = Path(sys.executable).with_name("harness")
    proc = subprocess.run([str(exe), command, str(path), "--results", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "values (aliases *name expanded)" in proc.stderr


# --------------------------------------------------------------------------- how evaluation samples (issue 23)
def test_eval_sampling_keys_default_to_auto_and_refuse_what_they_cannot_do(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert (spec.eval.precision, spec.eval.compile, spec.eval.batch_size) == ("auto", "auto", "auto")
    fine = load_spec(write(tmp_path, GOOD.replace("  num_samples: 10", "  num_samples: 10\n  precision: fp32\n"
                                                  "  compile: false\n  batch_size: 64")))
    assert (fine.eval.precision, fine.eval.compile, fine.eval.batch_size) == ("fp32", False, 64)
    for bad, needle in (("precision: fp16", "eval.precision"), ("compile: maybe", "eval.compile"),
                        ("batch_size: 0", "eval.batch_size"), ("batch_size: most", "eval.batch_size"),
                        ("keep_samples: first", "eval.keep_samples")):
        with pytest.raises(HarnessError, match=re.escape(needle)) as info:
            load_spec(write(tmp_path, GOOD.replace("  num_samples: 10", f"  num_samples: 10\n  {bad}")))
        assert "Fix" in str(info.value) and "\n" not in str(info.value), str(info.value)
