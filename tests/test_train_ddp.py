"""Two real processes (gloo, CPU) train the same weights as one with the same global batch."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from harness.train import run_training
from train_tiny import as_rank, free_port, final_state, tiny_run

TESTS = str(Path(__file__).resolve().parent)


def _worker(rank: int, world: int, port: int, run_dir: str) -> None:
    sys.path.insert(0, TESTS)
    as_rank(rank, world, port)
    run_training(tiny_run(steps=4), Path(run_dir))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(tiny_run(steps=4), tmp_path / "single")
    finally:
        torch.set_num_threads(old)
    a, b = final_state(tmp_path / "ddp", 4), final_state(tmp_path / "single", 4)
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert a["data_pos"] == b["data_pos"] == 4 * 16
    moved = 0.0
    for key in ("model", "ema"):
        for name, w in b[key].items():
            torch.testing.assert_close(a[key][name], w, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    init = torch.load(tmp_path / "single" / "checkpoints" / "step_0000002.pt", weights_only=True)
    for name, w in b["model"].items():
        moved = max(moved, (w - init["model"][name]).abs().max().item())
    assert moved > 1e-3  # the weights did train, so the agreement is not trivial
    for i, st in b["opt"]["state"].items():
        torch.testing.assert_close(a["opt"]["state"][i]["exp_avg"], st["exp_avg"], rtol=1e-4, atol=1e-6)
