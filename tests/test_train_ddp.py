"""Two real processes (gloo, CPU) train the same weights as one with the same global batch."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from harness.training.train import run_training
from tolerance import fp32_bound
from train_tiny import as_rank, assert_adam_close, free_port, final_state, tiny_run

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
    # 4 AdamW steps whose gradients are the 16 x 16 token terms summed in another order (2 ranks of 128, an
    # all-reduce and a halving vs one sum of 256: <= 256 roundings): weights, EMA and first moments within
    # lr x steps x that, Adam's sign where a gradient is ~0, and their own roundings (tolerance.adam_bound)
    assert_adam_close(a, b, lr=1e-3, steps=4, grad_rel=fp32_bound(256))
    init = torch.load(tmp_path / "single" / "checkpoints" / "step_0000002.pt", weights_only=True)
    for name, w in b["model"].items():
        moved = max(moved, (w - init["model"][name]).abs().max().item())
    assert moved > 1e-3  # the weights did train, so the agreement is not trivial
