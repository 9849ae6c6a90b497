"""Every conditioning block lets the timestep and the label reach the output, and the null class
erases the label (issue 16). The weights are randomised first: the paper's initialisation zeroes
the final layer (and adaLN-Zero's modulation), so an untrained DiT's output ignores everything."""
from __future__ import annotations

import pytest
import torch

from harness.config.registry import CONDITIONINGS
from harness.models.dit import build_model
from tolerance import fp32_bound, rel_err

NUM_CLASSES = 10


def randomised(conditioning: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("DiT-2x32x2/2", conditioning, input_size=8, in_channels=1, num_classes=NUM_CLASSES)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # not the fixed sin-cos positions
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def _differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample: does the output change by more than float noise? (N,) bool."""
    return (a - b).abs().flatten(1).amax(1) > 1e-4 * a.abs().max()


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_output_changes_with_t_and_y_and_not_under_the_null_class(conditioning):
    model = randomised(conditioning)
    x = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1)
    t = torch.tensor([10, 10, 500, 10])
    y = torch.tensor([3, 7, 3, 3])
    with torch.no_grad():
        out = model(x, t, y)
        forced = model(x, t, y, force_drop=torch.ones(4, dtype=torch.bool))
        partly = model(x, t, y, force_drop=torch.tensor([False, True, False, False]))
        null = model(x, t, torch.full_like(y, NUM_CLASSES))
    assert _differs(out[1:2], out[0:1]).all(), f"{conditioning}: the label does not reach the output"
    assert _differs(out[2:3], out[0:1]).all(), f"{conditioning}: the timestep does not reach the output"
    # Same inputs, same output, up to the order a batch row's sums may take at another position or batch: the
    # outputs reach ~7, so relative to their scale, 64 float32 roundings for one forward (test_interop's FORWARD),
    # well under _differs' 1e-4
    def same(a, b):
        return rel_err(a, b) < fp32_bound(64)
    assert same(out[3], out[0])  # the check is not noise
    # the null class forced for both labels: the labels no longer matter, and forcing equals passing it
    assert same(forced[1], forced[0])
    assert same(forced, null)
    assert _differs(forced[0:1], out[0:1]).all()
    # force_drop acts per sample: only the second one is dropped
    assert same(partly[[0, 2, 3]], out[[0, 2, 3]])
    assert same(partly[1], null[1])
