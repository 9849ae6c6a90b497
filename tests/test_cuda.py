"""On a GPU only (marker `cuda`, skipped without one; scripts/gpu-check.sh runs them): the fast
paths held against the plain ones. Tolerances are stated next to each check, before running it."""
from __future__ import annotations

import copy

import pytest
import torch

from harness.models.diffusion import create_diffusion
from harness.models.dit import build_model
from harness.training.runtime import Dist
from harness.training.step import Batch, TrainStep

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

SHAPE = (4, 32, 32)
MODEL = "DiT-S/2"


def _step(micro: int, precision: str = "bf16", compile: bool = False, compile_mode: str = "default") -> TrainStep:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(MODEL, "adaLN-Zero", input_size=32, in_channels=4, num_classes=1000).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return TrainStep(model, copy.deepcopy(model).requires_grad_(False), opt, create_diffusion(None),
                     Dist(device=dev), precision=precision, micro_batch=micro, compile=compile, ema_decay=0.9999,
                     compile_mode=compile_mode)


def _batch(n: int, seed: int = 1) -> Batch:
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    return Batch(torch.randn(n, *SHAPE, generator=g, device=dev), torch.randint(0, 1000, (n,), generator=g, device=dev),
                 torch.randint(0, 1000, (n,), generator=g, device=dev), torch.randn(n, *SHAPE, generator=g, device=dev),
                 torch.rand(n, generator=g, device=dev) < 0.1)


def _flat_grad(step: TrainStep) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in step.model.parameters() if p.grad is not None])


def test_micro_batches_in_bf16_match_one_pass():
    """bf16 autocast: 4 micro-batches of 16 vs one pass of 64. Relative L2 error of the whole
    gradient below 2e-2 (bf16 keeps 8 mantissa bits; the sums differ only in order)."""
    a, b = _step(64), _step(16)
    batch = _batch(64)
    a.accumulate(batch)
    b.accumulate(batch)
    ga, gb = _flat_grad(a), _flat_grad(b)
    assert ga.norm() > 0
    assert ((ga - gb).norm() / ga.norm()).item() < 2e-2


def test_compiled_loss_matches_eager():
    """Compiled vs eager forward+loss in bf16 on the same inputs: mean loss within 1e-2 relative."""
    eager, compiled = _step(32), _step(32, compile=True)
    batch = _batch(32)
    le = eager.accumulate(batch)[0].item()
    lc = compiled.accumulate(batch)[0].item()
    assert compiled.compiled, "compilation fell back to eager"
    assert abs(lc - le) / abs(le) < 1e-2


def test_cuda_graph_training_matches_eager():
    """train.compile_mode: reduce-overhead (CUDA graphs) with 2 micro-batches: three optimizer steps, each step's
    loss within 1e-2 relative of eager's (bf16: 8 mantissa bits; the same inputs and weights at every step)."""
    eager, graphs = _step(16), _step(16, compile=True, compile_mode="reduce-overhead")
    batch = _batch(32)
    for _ in range(3):
        le, lg = eager(batch, 1e-4)[0].item(), graphs(batch, 1e-4)[0].item()
        assert graphs.compiled, "compilation fell back to eager"
        assert abs(lg - le) / abs(le) < 1e-2, (le, lg)


def test_cuda_graph_sampling_forward_keeps_each_output():
    """The sampling forward under reduce-overhead: two calls on different inputs return what eager returns for
    each (bf16 autocast on both; 2e-2 relative L2), the first output intact after the second replay."""
    from harness.models.compiled import autocast
    from harness.sampling.sample import compiled_forward
    from precision_check import nudged

    torch.manual_seed(0)   # nudged: adaLN-Zero's zero-initialised output would make the comparison empty
    model = nudged(build_model(MODEL, "adaLN-Zero", input_size=32, in_channels=4, num_classes=1000)).cuda().eval()
    fwd = compiled_forward(model, True, "reduce-overhead")
    xs = [torch.randn(8, *SHAPE, device="cuda", generator=torch.Generator("cuda").manual_seed(i)) for i in (1, 2)]
    t, y = torch.full((8,), 500, device="cuda"), torch.arange(8, device="cuda")
    with torch.inference_mode(), autocast(torch.device("cuda"), "bf16"):
        outs = [fwd(x, t, y) for x in xs]
        refs = [model(x, t, y) for x in xs]
    for o, r in zip(outs, refs):
        assert ((o.float() - r.float()).norm() / r.float().norm()).item() < 2e-2


def test_fifty_bf16_steps_lower_the_loss():
    """50 steps of S/2 on one fixed batch (memorisation): the mean loss of the last 5 steps is below
    that of the first 5."""
    step = _step(32)
    batch = _batch(32)
    losses = [step(batch, 1e-3)[0].item() / 32 for _ in range(50)]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_cuda_sampling_equals_cpu_sampling():
    """DDIM (deterministic), 10 steps, fp32 on both with TF32 off, the same per-sample CPU noise:
    CUDA and CPU images (uint8) differ by at most one level (rounding at a level boundary)."""
    from harness.sampling.sample import sample_images
    from harness.config.spec import DataSpec, EvalSpec, RunSpec, TrainSpec
    from train_tiny import tf32_off

    torch.manual_seed(0)
    model = build_model("DiT-2x32x2/2", "adaLN-Zero", input_size=8, in_channels=1, num_classes=10).eval()
    run = RunSpec(run_id="x", sweep="t", model="DiT-2x32x2/2", conditioning="adaLN-Zero", seed=0,
                  data=DataSpec(), train=TrainSpec(), eval=EvalSpec())
    labels = torch.arange(8) % 10
    kw = dict(sampling_steps=10, sampler="ddim", cfg_scale=1.0, guidance_channels=3, seed=7)
    with tf32_off():
        cpu = sample_images(model, run, labels, device=torch.device("cpu"), **kw)
        gpu = sample_images(model.cuda(), run, labels, device=torch.device("cuda"), **kw)
    assert cpu.shape == gpu.shape
    assert (cpu.astype("float64") - gpu.astype("float64")).__abs__().max() <= 1.0  # uint8 images: <= 1 level


def test_training_on_cuda_turns_tf32_on_and_fuses_adamw(tmp_path):
    """The paper's fp32 runs on an H100 use TF32 matmuls and convolutions: the trainer sets both switches;
    the model, its EMA and a fused AdamW live on the GPU."""
    from harness.training.train import Trainer
    from train_tiny import tf32_off, tiny_run

    with tf32_off():
        trainer = Trainer(tiny_run(), tmp_path, Dist(device=torch.device("cuda")))
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    assert trainer.opt.defaults["fused"] is True   # one kernel for the whole AdamW step
    assert next(trainer.model.parameters()).is_cuda and next(trainer.ema.parameters()).is_cuda
