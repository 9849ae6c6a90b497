"""Micro-batching: the global batch keeps its meaning whatever the micro-batch, on one rank and two,
through an interrupted accumulation, and `auto` picks a size that fits (and says so)."""
from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from harness.models.diffusion import create_diffusion
from harness.errors import HarnessError
from harness.models.dit import build_model
from harness.training.runtime import Dist
from harness.training.step import Batch, BatchGeometry, TrainStep, check_micro_batch, resolve_compile
from harness.training.train import run_training
from diffusion_helpers import training_losses
from train_tiny import as_rank, free_port, TINY_MODEL, assert_adam_close, assert_bitwise_equal, final_state, tiny_run
from tolerance import fp32_bound, rel_err

TESTS = str(Path(__file__).resolve().parent)
SHAPE = (1, 8, 8)
# fp32 gradients of one pass over 8 samples vs the same 8 in micro-batches: equal up to the order in which
# the 8 x 16 token contributions are summed. Per tensor, relative to its scale (0.1..0.4 here, other tensors
# elsewhere): n - 1 roundings, the worst case for a sum of n = 128 terms (8 measured)
GRAD_TOL = fp32_bound(128)


def _step(micro_batch: int, dist: Dist | None = None, seed: int = 0) -> TrainStep:
    torch.manual_seed(seed)
    model = build_model(TINY_MODEL, "adaLN-Zero", input_size=8, in_channels=1, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return TrainStep(model, copy.deepcopy(model).requires_grad_(False), opt, create_diffusion(None),
                     dist or Dist(), precision="fp32", micro_batch=micro_batch, compile=False, ema_decay=0.9)


def _batch(n: int = 8, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g),
                 torch.randint(0, 1000, (n,), generator=g), torch.randn(n, *SHAPE, generator=g),
                 torch.rand(n, generator=g) < 0.3)


def _grads(step: TrainStep) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in step.model.named_parameters() if p.grad is not None}


def test_two_micro_batches_of_four_give_the_gradient_of_one_batch_of_eight():
    whole, split = _step(8), _step(4)
    batch = _batch()
    sums_whole, sums_split = whole.accumulate(batch), split.accumulate(batch)
    g1, g2 = _grads(whole), _grads(split)
    assert g1.keys() == g2.keys() and len(g1) > 10
    assert max(g.abs().max().item() for g in g1.values()) > 1e-3  # real gradients, not zeros
    for name in g1:
        assert rel_err(g2[name], g1[name]) < GRAD_TOL, name
    torch.testing.assert_close(sums_split, sums_whole, rtol=1e-6, atol=0)  # fp32 sums of 4 vs 8 terms
    # and the loss is the mean over the batch: the sum returned / 8 equals the plain mean
    plain = training_losses(whole.diffusion, whole.model, batch.x0, batch.t,
                            {"y": batch.y, "force_drop": batch.drop}, noise=batch.noise)
    assert sums_whole[0].item() / 8 == pytest.approx(plain["loss"].mean().item(), rel=fp32_bound(8))  # fp32 mean of 8


def test_a_full_step_with_micro_batches_moves_weights_and_ema_once():
    step = _step(2)
    before = {n: p.detach().clone() for n, p in step.model.named_parameters()}
    ema_before = {n: p.detach().clone() for n, p in step.ema.named_parameters()}
    step(_batch(), lr=1e-3)
    assert all(p.grad is None for p in step.model.parameters())  # gradients are cleared after the step
    assert len(step.opt.state) and all(int(s["step"]) == 1 for s in step.opt.state.values())  # one AdamW step
    moved = [n for n, p in step.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved
    for n, p in step.ema.named_parameters():  # one EMA update: 0.9 old + 0.1 new
        new = dict(step.model.named_parameters())[n].detach()
        # weights up to ~1: 3 float32 roundings on each side (two products, a sum) and 0.1 vs 1 - 0.9, relative
        assert rel_err(p, 0.9 * ema_before[n] + 0.1 * new) < fp32_bound(8), n


def test_micro_batch_must_divide_the_per_gpu_batch(tmp_path):
    with pytest.raises(HarnessError, match=r"train.micro_batch: 3 does not divide the per-GPU batch of 8"):
        check_micro_batch(3, 8)
    with pytest.raises(HarnessError, match="train.micro_batch: 3 does not divide the per-GPU batch of 16"):
        run_training(tiny_run(steps=1, micro_batch=3), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "train.jsonl").exists()


def test_the_batch_geometry_is_validated_once_and_says_itself_in_one_line():
    """BatchGeometry: global batch over ranks, per rank in micro-batches; each rank's rows; both divisions
    checked where it is made, the errors naming the run.json and the key (or bench's flag)."""
    g = BatchGeometry.of(32, 4, "auto")
    assert (g.global_batch, g.ranks, g.per_rank, g.micro) == (32, 4, 8, None)
    assert [g.rows(r) for r in range(4)] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert g.with_micro(2) == BatchGeometry(32, 4, 2) == BatchGeometry.of(32, 4, "2")
    assert str(g.with_micro(2)) == "per-GPU batch 8 in micro-batches of 2 (global batch 32 over 4 ranks)"
    assert str(BatchGeometry(16, 1, 16)) == "per-GPU batch 16 in micro-batches of 16 (global batch 16 over 1 rank)"
    with pytest.raises(HarnessError) as err:
        BatchGeometry(16, 3, source="run/run.json: ")
    assert str(err.value) == "run/run.json: train.global_batch: 16 does not split over 3 ranks. Fix: use a multiple of 3."
    with pytest.raises(HarnessError, match=r"^--micro-batch: 3 does not divide the per-GPU batch of 8\. Fix"):
        BatchGeometry.of(32, 4, 3, micro_key="--micro-batch")
    with pytest.raises(HarnessError, match=r"^train.micro_batch: 3 does not divide the per-GPU batch of 8\. Fix"):
        g.with_micro(3)


def test_compile_true_where_it_cannot_compile_is_one_line(monkeypatch):
    import harness.models.compiled  # compile_support's home since the sampling-precision change

    monkeypatch.setattr(harness.models.compiled.shutil, "which", lambda name: None)
    cpu = torch.device("cpu")
    with pytest.raises(HarnessError, match=r"train.compile: true, but .*C\+\+ compiler.*Fix: set train.compile: auto"):
        resolve_compile(True, cpu)
    assert resolve_compile("auto", cpu) is False and resolve_compile(False, cpu) is False


# ----------------------------------------------------------------------------- resume and records
def test_resume_from_a_crash_inside_an_accumulation_is_bitwise_exact(tmp_path, monkeypatch):
    """A job killed between two micro-batches of step 4 resumes from step 2's checkpoint and ends
    bitwise where an uninterrupted run ends; the half-accumulated gradient leaves no trace."""
    run = tiny_run(steps=6, micro_batch=4)  # global 16 on one rank: 4 micro-batches a step
    calls = {"n": 0}
    real = TrainStep.forward_backward

    def dying(self, b, total):
        calls["n"] += 1
        if calls["n"] == 3 * 4 + 2:  # the second micro-batch of step 4
            raise KeyboardInterrupt("preempted")
        return real(self, b, total)

    monkeypatch.setattr(TrainStep, "forward_backward", dying)
    with pytest.raises(KeyboardInterrupt):
        run_training(run, tmp_path / "a")
    monkeypatch.setattr(TrainStep, "forward_backward", real)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("*.pt")) == ["step_0000002.pt"]
    run_training(run, tmp_path / "a")
    run_training(run, tmp_path / "b")
    assert_bitwise_equal(final_state(tmp_path / "a", 6), final_state(tmp_path / "b", 6))


def test_micro_batch_is_bookkeeping_the_run_trains_the_same_model(tmp_path):
    from harness.io import read_jsonl

    a, b = tiny_run(steps=3, micro_batch=16), tiny_run(steps=3, micro_batch=4)
    assert a.run_id == b.run_id
    run_training(a, tmp_path / "a")
    run_training(b, tmp_path / "b")
    sa, sb = final_state(tmp_path / "a", 3), final_state(tmp_path / "b", 3)
    # 3 AdamW steps whose gradients are sums of 16 x 16 token terms in another order (255 roundings): the
    # weights agree to lr x steps x that, Adam's sign where a gradient is ~0, and the weights' own roundings
    assert_adam_close(sb, sa, lr=1e-3, steps=3, grad_rel=fp32_bound(256))
    rec = list(read_jsonl(tmp_path / "b" / "train.jsonl"))[-1]
    assert rec["micro_batch"] == 4 and rec["compiled"] is False and rec["tflops_per_device"] > 0
    assert rec["mfu"] is None  # no known peak for a CPU


# ----------------------------------------------------------------------------- auto
def test_auto_on_cpu_picks_the_largest_size_that_fits_and_says_so(monkeypatch, caplog):
    from harness.training import microbatch

    caplog.set_level(logging.INFO, logger="harness")
    step = _step(16)
    per_sample = microbatch._activation_bytes(step, 1, SHAPE, 10)
    fixed = 4 * sum(p.numel() * p.element_size() for p in step.model.parameters())
    assert per_sample > 0
    # a budget with room for 5 samples' activations: the largest divisor of 16 that fits is 4
    monkeypatch.setenv(microbatch.BUDGET_ENV, str((fixed + 5.5 * per_sample) / 2**20))
    key = "tiny|test"
    assert microbatch.resolve_micro_batch(BatchGeometry(16), step, key, SHAPE, 10) == BatchGeometry(16, 1, 4)
    assert "micro-batch 4 of a per-GPU batch of 16 (auto" in caplog.text
    assert all(p.grad is None for p in step.model.parameters())  # the probe leaves no gradient
    caplog.clear()
    assert microbatch.resolve_micro_batch(BatchGeometry(16), step, key, SHAPE, 10).micro == 4  # from the cache
    assert "cached" in caplog.text
    # a roomy budget: the whole batch in one pass
    monkeypatch.setenv(microbatch.BUDGET_ENV, "100000")
    assert microbatch.find_micro_batch(step, 16, SHAPE, 10) == 16


def test_auto_that_finds_nothing_names_the_smallest_size_tried(monkeypatch):
    from harness.training import microbatch

    monkeypatch.setenv(microbatch.BUDGET_ENV, "0.001")
    with pytest.raises(HarnessError, match=r"found no micro-batch that fits.*smallest tried was 1"):
        microbatch.find_micro_batch(_step(16), 16, SHAPE, 10)


def test_auto_probe_does_not_disturb_training_randomness(tmp_path):
    """A run with micro_batch auto equals, bitwise, the same run with the size auto picked."""
    run_training(tiny_run(steps=2, micro_batch="auto"), tmp_path / "auto")
    run_training(tiny_run(steps=2, micro_batch=16), tmp_path / "fixed")
    assert_bitwise_equal(final_state(tmp_path / "auto", 2), final_state(tmp_path / "fixed", 2))


# ----------------------------------------------------------------------------- DDP
def _ddp_grads(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, TESTS)
    as_rank(rank, world, port)
    from harness.training.runtime import distributed

    with distributed() as dist:
        step = _step(2, dist)  # per-rank batch 4 in two micro-batches of 2; global 8
        step.accumulate(_batch().slice(4 * rank, 4 * rank + 4))
        if rank == 0:
            torch.save(_grads(step), out)


@pytest.mark.slow
def test_ddp_two_ranks_with_micro_batches_give_the_one_batch_gradient(tmp_path):
    """2 gloo ranks x 2 micro-batches of 2 (no_sync on the first): the synchronised gradient is
    the gradient of the mean over all 8, as one process computes it in one pass."""
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_grads, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    whole = _step(8)
    whole.accumulate(_batch())
    ref = _grads(whole)
    assert ddp.keys() == ref.keys()
    for name in ref:
        assert rel_err(ddp[name], ref[name]) < GRAD_TOL, name


def test_a_compiler_failure_falls_back_to_eager_in_one_line(monkeypatch, caplog):
    """If compiling fails at the first step, the step warns once, leaves no half-accumulated
    gradient, and the result equals the eager step's."""
    import harness.training.step

    def broken_compile(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("inductor: no backend for this platform\n  long compiler log ...")
        return call

    caplog.set_level(logging.WARNING, logger="harness")
    monkeypatch.setattr(harness.training.step.torch, "compile", broken_compile)
    eager, failing = _step(4), _step(4)
    failing.compiled = True
    failing._set_functions()
    batch = _batch()
    sums_eager = eager(batch, 1e-3)
    sums_failing = failing(batch, 1e-3)
    assert not failing.compiled
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "torch.compile failed for the model and the loss (RuntimeError: inductor: no backend" in warnings[0]
    assert "\n" not in warnings[0]
    assert torch.equal(sums_eager, sums_failing)
    for (n, a), b in zip(eager.model.named_parameters(), failing.model.parameters()):
        assert torch.equal(a, b), n
