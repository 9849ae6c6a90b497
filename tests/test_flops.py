"""Gflops as the paper counts them (fvcore, one multiply-add = one flop), against Table 4."""
import json
import subprocess
import sys

import pytest

from harness import paper
from harness.models.flops import count_flops, flops_table, model_gflops
from harness.models.dit import build_model


def test_known_answer_on_a_tiny_model_counted_by_hand():
    # depth 1, hidden 8, 2 heads (d_head 4), patch 2 on a 4x4x1 input: T = 4 tokens, D = 8.
    model = build_model("DiT-1x8x2/2", "adaLN-Zero", input_size=4, in_channels=1, num_classes=2)
    T, D = 4, 8
    linears = (
        256 * D + D * D          # timestep MLP (256-d frequencies -> D -> D), one row
        + D * 6 * D              # block adaLN modulation, one row
        + T * D * 3 * D          # qkv
        + T * D * D              # attention output projection
        + T * D * 4 * D * 2      # MLP fc1 + fc2
        + D * 2 * D              # final-layer modulation
        + T * D * (2 * 2 * 2)    # final linear to p*p*2C
    )
    conv = T * D * (1 * 2 * 2)   # patch embedding
    attention = 2 * (2 * T * T * (D // 2))  # Q K^T and A V over 2 heads
    layer_norms = 3 * 4 * T * D  # norm1, norm2, norm_final; fvcore: 4 per element without affine
    gflops, params = count_flops(model, 4, 1)
    assert gflops * 1e9 == pytest.approx(linears + conv + attention + layer_norms, abs=0.5)
    assert params == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_all_fifteen_rows_of_table4_within_one_percent():
    rows = [r for r in paper.table4() if r["image_size"] == 256 and r["train_steps"] == 400000]
    assert len(rows) == 15
    for row in rows:
        gflops, params = model_gflops(row["model"], row["conditioning"], input_size=32, in_channels=4,
                                      use_cache=False)
        assert gflops == pytest.approx(row["gflops"], rel=0.01), row
        assert params / 1e6 == pytest.approx(row["params_m"], rel=0.02), row


def test_default_table_lists_twelve_variants_then_the_ablation(monkeypatch):
    import harness.models.flops as flops

    monkeypatch.setattr(flops, "model_gflops", lambda *a, **k: (1.0, 1_000_000))
    rows = flops_table(None, None, 256)
    assert [r["model"] for r in rows[:12]][:3] == ["DiT-S/8", "DiT-S/4", "DiT-S/2"]
    assert [(r["model"], r["conditioning"]) for r in rows[12:]] == [
        ("DiT-XL/2", "in-context"), ("DiT-XL/2", "cross-attention"), ("DiT-XL/2", "adaLN")]
    assert rows[0]["paper_gflops"] == 0.36


@pytest.mark.parametrize("conditioning", ["adaLN-Zero", "in-context", "cross-attention", "adaLN"])
def test_depth_extrapolation_equals_a_full_count(conditioning):
    # model_gflops measures depth 1 and 2 and extrapolates; a full trace of all 12 blocks must agree.
    full = count_flops(build_model("DiT-S/4", conditioning, input_size=32, in_channels=4), 32, 4)
    fast = model_gflops("DiT-S/4", conditioning, input_size=32, in_channels=4, use_cache=False)
    assert fast[0] == pytest.approx(full[0], rel=1e-12) and fast[1] == full[1]


def test_cache_returns_the_measured_value():
    first = model_gflops("DiT-2x32x2/2", "adaLN-Zero", input_size=8, in_channels=1, num_classes=10)
    again = model_gflops("DiT-2x32x2/2", "adaLN-Zero", input_size=8, in_channels=1, num_classes=10)
    fresh = model_gflops("DiT-2x32x2/2", "adaLN-Zero", input_size=8, in_channels=1, num_classes=10,
                         use_cache=False)
    assert first == again == fresh


def _harness(*args):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=120)


def test_cli_json_for_one_model():
    out = _harness("flops", "--model", "DiT-S/8", "--format", "json")
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["model"] == "DiT-S/8" and abs(row["rel_err"]) < 0.01


@pytest.mark.parametrize("args, needle", [
    (["--model", "DiT-XXL/2"], "DiT-XL/2"),
    (["--model", "DiT-4x64x3/2"], "not divisible by 3 heads"),
    (["--model", "DiT-S/8", "--image-size", "12", "--pixel"], "patch sizes that divide"),
    (["--model", "DiT-S/2", "--conditioning", "film"], "adaLN-Zero"),
])
def test_cli_bad_input_is_one_clear_line_without_traceback(args, needle):
    out = _harness("flops", *args)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr
