"""Every number in a sweep spec has a finite range (issue 28, findings 1 and 2): each numeric field of
the schema is walked with NaN, inf, a negative, zero and a huge value; each out-of-range value is one
line naming file, line, key and fix, and refused before anything is planned or written."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from harness import cli
from harness.config import limits
from harness.config import spec as S
from harness.errors import HarnessError
from harness.config.spec import load_spec

GOOD = """\
name: t
models: [DiT-2x32x2/4]
seeds: [0]
data:
  image_size: 8
train:
  steps: 30
  global_batch: 8
eval:
  at_steps: [30]
  num_samples: 10
launcher:
  kind: local
"""
SECTIONS = {"data": S.DataSpec, "train": S.TrainSpec, "eval": S.EvalSpec, "launcher": S.LauncherSpec}
NUMERIC = (int, float, "auto_int")


def _numeric_fields():
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.metadata["kind"] in NUMERIC or f.metadata.get("item") in (int, float):
                yield name, f.name, dict(f.metadata)
    yield None, "seeds", {"kind": list, "min": 0}
    yield "models", "patches", {"kind": list, "min": 1}


FIELDS = list(_numeric_fields())
VALUES = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf", "negative": "-1", "zero": "0", "huge": "1e30"}


def _with(section: str | None, key: str, value: str) -> str:
    """GOOD with `section.key` set to `value` (a list of it for list keys)."""
    lines = GOOD.splitlines()
    if section is None:  # top-level list
        return "\n".join(x for x in lines if not x.startswith(key + ":")) + f"\n{key}: [{value}]\n"
    if section == "models":
        return GOOD.replace("models: [DiT-2x32x2/4]", f"models: {{sizes: [S], patches: [{value}]}}")
    kind = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == key).metadata["kind"]
    item = f"[{value}]" if kind is list else value
    head = lines.index(f"{section}:")
    rest = [x for x in lines[head + 1:] if not x.startswith(f"  {key}:")]
    return "\n".join(lines[:head + 1] + [f"  {key}: {item}"] + rest) + "\n"


def test_every_numeric_field_has_a_finite_documented_upper_bound():
    for section, key, meta in FIELDS:
        if section in SECTIONS:
            assert meta.get("max", meta.get("lt")) is not None, f"{section}.{key} has no upper bound"
            assert meta.get("why"), f"{section}.{key}: its bound needs the reason it follows from"
            assert f"{SECTIONS[section].__name__}.{key}:" in S.__doc__, f"{section}.{key} missing from the docs"


@pytest.mark.parametrize("case", sorted(VALUES))
@pytest.mark.parametrize("section,key,meta", FIELDS, ids=[f"{s}.{k}" for s, k, _ in FIELDS])
def test_every_numeric_field_refuses_nan_inf_negative_zero_and_huge(tmp_path, section, key, meta, case):
    path = tmp_path / "spec.yaml"
    path.write_text(_with(section, key, VALUES[case]))
    lo = meta.get("min", 0 if "gt" in meta else None)
    allowed = case == "zero" and lo == 0 and "gt" not in meta  # a field whose range starts at 0
    dotted = f"{section}.{key}" if section else key
    try:
        load_spec(path)
    except HarnessError as err:
        msg = str(err)
        if allowed:  # zero is in range: only a cross-key rule may refuse it, never the range check
            assert "must be" not in msg and "finite" not in msg and dotted not in msg.split(": ")[1], msg
            return
        assert msg.startswith(f"{path}:") and f": {dotted}" in msg, msg
        assert "Fix:" in msg and "\n" not in msg and len(msg) < 400 + len(str(path)), msg
        return
    assert allowed, f"{dotted}: {VALUES[case]} was accepted"


@pytest.mark.parametrize("model,image_size,autoencoder,needle", [
    ("DiT-XL/2", 2048, "sd-vae-ft-ema", "data.image_size: must be <= 1,024"),
    ("DiT-XL/2", 4096, "identity", "data.image_size: must be <= 1,024"),
    ("DiT-2x32x2/2", 256, "identity", "models[0]: 16,384 tokens per image"),
    ("DiT-2x100000x4/2", 8, "identity", "parameters, over the limit of 5e+09"),
    ("DiT-99999999999x32x2/2", 8, "identity", "parameters, over the limit"),
])
def test_geometry_beyond_the_bounds_is_refused_in_milliseconds(tmp_path, model, image_size, autoencoder, needle):
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD.replace("DiT-2x32x2/4", model).replace(
        "image_size: 8", f"image_size: {image_size}\n  autoencoder: {autoencoder}"))
    t0 = time.perf_counter()
    with pytest.raises(HarnessError, match="Fix:") as err:
        load_spec(path)
    assert time.perf_counter() - t0 < 1.0
    assert needle in str(err.value), err.value


def test_the_largest_allowed_geometry_loads(tmp_path):
    """The bounds are not tighter than meant: 1024 px through the VAE at patch 2 is 4,096 tokens."""
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD.replace("DiT-2x32x2/4", "DiT-XL/2").replace(
        "image_size: 8", "image_size: 1024\n  autoencoder: sd-vae-ft-ema\n  num_classes: 1000"))
    spec = load_spec(path)
    run = spec.expand()[0]
    assert (run.data.input_size // run.shape.patch) ** 2 == limits.MAX_TOKENS


@pytest.mark.parametrize("command", ["plan", "sweep"])
def test_a_huge_image_size_is_one_line_and_writes_nothing(tmp_path, capsys, command):
    """Finding 2: `image_size: 1000000` was a NumPy traceback in plan, and sweep left files behind."""
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD.replace("image_size: 8", "image_size: 1000000"))
    results = tmp_path / "results"
    args = [command, str(path)] + (["--results", str(results)] if command == "sweep" else [])
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:5: data.image_size: must be <= 1,024") and err.count("\n") == 1, err
    assert not results.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_ema_decay_nan_never_reaches_a_run(tmp_path):
    """Finding 1: `ema_decay: .nan` used to train to "done" with a NaN EMA and a FID recorded."""
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD.replace("global_batch: 8", "global_batch: 8\n  ema_decay: .nan"))
    with pytest.raises(HarnessError, match=r"spec.yaml:9: train.ema_decay: nan is not a finite number\. Fix: "
                                           r"write a number between 0 and 1"):
        load_spec(path)


def test_shipped_sweeps_are_within_the_bounds():
    """(reproduce.yaml needs the released weights on disk for its train.init_from: not checked here.)"""
    paths = sorted(Path(S.__file__).resolve().parents[1].joinpath("sweeps").glob("*.yaml"))
    for path in [p for p in paths if p.name != "reproduce.yaml"]:
        assert load_spec(path).expand(), path
