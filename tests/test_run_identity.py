"""Each key of the normalised training identity changes the run id; each other key does not
(issue 16). The key lists come from the spec itself: every field of DataSpec and TrainSpec, sorted
by what the spec's documentation (harness/config/spec.py's docstring) says about it, so a new key that the
docstring does not place fails here instead of silently joining or leaving the hash."""
from __future__ import annotations

import dataclasses
import re

import pytest

from harness.config import spec as S
from harness.config.spec import DataSpec, TrainSpec, make_run_id

BASE = ("DiT-S/2", "adaLN-Zero", 0)


def _documented(phrase: str) -> set[str]:
    """The comma-separated names in the parentheses after `phrase` in the spec docstring."""
    text = " ".join(S.__doc__.split())
    match = re.search(re.escape(phrase) + r"\s*\(([^)]*)\)", text)
    assert match, f"harness/config/spec.py's docstring no longer says {phrase!r} (...): update this test with it"
    return {name.strip().split(".")[-1].split(":")[0] for name in match.group(1).split(",")}


IDENTITY = {"data": _documented("the data keys that change the pixels"),
            "train": _documented("the train keys that change the maths")}
EXCLUDED = {"data": _documented("file locations"),
            "train": _documented("bookkeeping") | {"steps"}}  # "and train.steps (raising ...)"
CLASSES = {"data": DataSpec, "train": TrainSpec}


def _other_value(f: dataclasses.Field, value):
    """A valid value of field `f` different from `value`."""
    meta = f.metadata
    if "choices" in meta:
        return next(c for c in meta["choices"] if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value > 0 else 0.25
    if f.name == "init_from":  # identity through its file's content hash: a file that exists
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as tmp:
            tmp.write(b"weights")
        return tmp.name
    return "/elsewhere/data"  # paths (None by default)


def _fields():
    for block, cls in CLASSES.items():
        for f in dataclasses.fields(cls):
            yield block, f


def test_every_spec_key_is_documented_as_identity_or_not():
    for block, f in _fields():
        placed = (f.name in IDENTITY[block]) + (f.name in EXCLUDED[block])
        assert placed == 1, (f"{block}.{f.name}: harness/config/spec.py's docstring must name it exactly once, either "
                             "among the keys the run id hashes or among the excluded ones")
    for block in CLASSES:  # and the docstring names no key that does not exist
        names = {f.name for f in dataclasses.fields(CLASSES[block])}
        assert IDENTITY[block] | EXCLUDED[block] <= names, (IDENTITY[block] | EXCLUDED[block]) - names


@pytest.mark.parametrize("block,f", list(_fields()), ids=lambda v: getattr(v, "name", v))
def test_identity_keys_change_the_run_id_and_bookkeeping_keys_do_not(block, f):
    blocks = {"data": DataSpec(), "train": TrainSpec()}
    base = make_run_id(*BASE, blocks["data"], blocks["train"])
    changed = dict(blocks)
    changed[block] = dataclasses.replace(blocks[block], **{f.name: _other_value(f, getattr(blocks[block], f.name))})
    run_id = make_run_id(*BASE, changed["data"], changed["train"])
    if f.name in IDENTITY[block]:
        assert run_id != base, f"{block}.{f.name} changes the training but not the run id"
    else:
        assert run_id == base, f"{block}.{f.name} is bookkeeping but changes the run id"


def test_model_conditioning_and_seed_change_the_run_id():
    base = make_run_id(*BASE, DataSpec(), TrainSpec())
    for other in (("DiT-S/4", "adaLN-Zero", 0), ("DiT-S/2", "adaLN", 0), ("DiT-S/2", "adaLN-Zero", 1)):
        assert make_run_id(*other, DataSpec(), TrainSpec()) != base


def test_the_identity_is_normalised(tmp_path):
    """Spellings of one value in the YAML (lr: 1, 1.0, 1e0) are the same run; the readable prefix names it."""
    from harness.config.spec import load_spec

    ids = set()
    for i, lr in enumerate(("1", "1.0", "1e0")):
        path = tmp_path / f"s{i}.yaml"
        path.write_text(f"name: s\nmodels: [DiT-S/2]\ntrain: {{lr: {lr}, steps: 10}}\neval: {{at_steps: [10]}}\n")
        ids.add(load_spec(path).expand()[0].run_id)
    assert len(ids) == 1 and ids.pop().startswith("DiT-S-2_adaLN-Zero_s0_")


def test_run_ids_of_the_smoke_sweep_are_stable():
    """The ids results folders already carry: any change to what the hash reads or how (key names,
    JSON layout, digest length) orphans every existing run folder, so it must be a deliberate
    migration that updates these known answers (a new spec key changes them too unless excluded)."""
    from pathlib import Path

    from harness.config.spec import load_spec

    smoke = Path(__file__).resolve().parent.parent / "sweeps" / "smoke.yaml"
    assert [r.run_id for r in load_spec(smoke).expand()] == [
        "DiT-2x32x2-4_adaLN-Zero_s0_d01564", "DiT-2x32x2-2_adaLN-Zero_s0_0b02bb"]
    assert make_run_id(*BASE, DataSpec(), TrainSpec()) == "DiT-S-2_adaLN-Zero_s0_0fe440"


def test_init_from_enters_the_identity_by_content_not_by_path(tmp_path, monkeypatch):
    from harness.config.spec import init_from_digest

    weights = tmp_path / "a" / "w.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"weights one")
    monkeypatch.setenv("WEIGHTS_HOME", str(tmp_path / "a"))
    train = TrainSpec(init_from="${WEIGHTS_HOME}/w.pt")
    identity = S.run_identity(*BASE, DataSpec(), train)
    assert "init_from" not in identity["train"]
    assert identity["train"]["init_from_sha256"] == init_from_digest(weights)
    first = make_run_id(*BASE, DataSpec(), train)
    moved = tmp_path / "b" / "w.pt"
    moved.parent.mkdir()
    moved.write_bytes(b"weights one")
    assert make_run_id(*BASE, DataSpec(), TrainSpec(init_from=str(moved))) == first      # moved: the same id
    moved.write_bytes(b"weights two")
    assert make_run_id(*BASE, DataSpec(), TrainSpec(init_from=str(moved))) != first      # new content: a new id
    monkeypatch.delenv("WEIGHTS_HOME")
    with pytest.raises(S.HarnessError) as err:
        make_run_id(*BASE, DataSpec(), train)
    assert str(err.value).startswith("train.init_from: '${WEIGHTS_HOME}/w.pt' uses the unset environment variable")
