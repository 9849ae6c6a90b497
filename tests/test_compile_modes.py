"""train.compile_mode / eval.compile_mode / --compile-mode (issue 23's kernel-search and CUDA-graph modes): every
mode is one torch.compile accepts, the spec's mode reaches torch.compile in the trainer and in evaluation, a
CUDA-graph mode's outputs survive the next call, and a compiler failure in sampling falls back to eager in one
line. (The modes' speed is measured on a GPU: `harness bench --compile-mode`, scripts/gpu-check.sh.)"""
from __future__ import annotations

import logging

import pytest
import torch

import harness.models.compiled
from harness.data.autoencoder import IdentityAutoencoder
from harness.config.vocab import COMPILE_MODES, CUDA_GRAPH_MODES
from harness.models.compiled import CompiledOrEager, compile_options
from harness.sampling.sample import sample_images
from harness.training.train import run_training
from tolerance import fp32_bound, rel_err
from train_tiny import nudged_tiny_dit, tiny_run


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_every_mode_is_one_torch_compile_runs(mode):
    """A real inductor compile in each mode (on the CPU the graph modes compile without graphs). Inductor's
    vectorised tanh may differ from ATen's by a few roundings: bound 8 float32 roundings of the output's scale."""
    x = torch.linspace(-1, 1, 64)
    f = CompiledOrEager(lambda t: torch.tanh(t) * 2 + 1, True, "a pointwise function", mode=mode)
    assert rel_err(f(x), torch.tanh(x) * 2 + 1) <= fp32_bound(8)
    assert f.compiled, f"torch.compile refused mode {mode!r}"


@pytest.fixture
def compile_spy(monkeypatch):
    """torch.compile replaced by a recorder that returns its function uncompiled: which modes were asked for."""
    seen: list[str] = []

    def spy(fn, **kw):
        seen.append(kw.get("mode", "default"))
        return fn

    monkeypatch.setattr(torch, "compile", spy)
    return seen


@pytest.mark.parametrize("train_mode,eval_mode", [("default", "default"),
                                                  ("max-autotune-no-cudagraphs", "reduce-overhead")])
def test_the_specs_modes_reach_torch_compile(tmp_path, compile_spy, train_mode, eval_mode):
    run = tiny_run(steps=2, at_steps=[2], compile=True, compile_mode=train_mode,
                   eval={"compile": True, "compile_mode": eval_mode, "num_samples": 20, "batch_size": 10,
                         "metrics": ["fid"]})
    run_training(run, tmp_path / "run")
    assert compile_spy[:2] == [train_mode, train_mode]   # the model's forward and the loss terms
    assert compile_spy[2:] == [eval_mode]                # the sampling forward, once for the whole evaluation
    assert compile_options("default") == {}             # "default" leaves torch.compile's own default


def test_a_cuda_graph_modes_outputs_survive_the_next_call(monkeypatch):
    """CUDA graphs reuse their output buffer on every replay: the wrapper hands out copies. Stood in for by a
    function that writes every result into one buffer, as a replayed graph does."""
    buffer = torch.zeros(3)

    def replayed(x):
        buffer.copy_(x * 2)
        return buffer

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: replayed)
    monkeypatch.setattr(harness.models.compiled, "new_graph_step", lambda mode: None)  # no CUDA here
    for mode in CUDA_GRAPH_MODES:
        f = CompiledOrEager(replayed, True, "a replayed graph", mode=mode)
        first = f(torch.ones(3))
        f(torch.full((3,), 5.0))
        assert torch.equal(first, torch.full((3,), 2.0)), mode
    plain = CompiledOrEager(replayed, True, "a plain graph", mode="default")
    first = plain(torch.ones(3))
    plain(torch.full((3,), 5.0))
    assert torch.equal(first, torch.full((3,), 10.0))   # the stand-in does overwrite: the copy above is needed


def test_a_sampling_compiler_failure_falls_back_to_eager_in_one_line(monkeypatch, caplog):
    """The compiled sampling forward fails at its first call: one warning line, and the images equal eager's."""
    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("inductor: no backend for this platform\n  long compiler log ...")
        return call

    model = nudged_tiny_dit().eval()
    kw = dict(sampling_steps=4, sampler="ddim", seed=0, batch_size=5, autoencoder=IdentityAutoencoder())
    labels = [0, 1, 2, 3, 4]
    eager = sample_images(model, None, labels, **kw)
    caplog.set_level(logging.WARNING, logger="harness")
    monkeypatch.setattr(torch, "compile", broken)
    fallen = sample_images(model, None, labels, compile=True, compile_mode="max-autotune", **kw)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "torch.compile failed for the sampling forward" in warnings[0], warnings
    assert "\n" not in warnings[0]
    assert (eager == fallen).all()
