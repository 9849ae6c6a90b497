"""Tiny training runs shared by the trainer tests (not a test module itself)."""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from harness.config.spec import DataSpec, EvalSpec, RunSpec, TrainSpec

TINY_MODEL = "DiT-2x32x2/2"


def tiny_run(steps: int = 6, **train: object) -> RunSpec:
    """A run of a 2-block, 32-wide DiT on 8x8 digits; no evaluation unless at_steps are given."""
    at_steps = train.pop("at_steps", [])
    ev = train.pop("eval", {})
    base = dict(steps=steps, global_batch=16, lr=1e-3, ema_decay=0.9, ckpt_every=2, log_every=1, keep_last=2)
    base.update(train)
    return RunSpec(run_id="tiny", sweep="test", model=TINY_MODEL, conditioning="adaLN-Zero", seed=0,
                   data=DataSpec(), train=TrainSpec(**base),
                   eval=dataclasses.replace(EvalSpec(at_steps=list(at_steps), sampling_steps=[5]), **ev))


def nudged_tiny_dit(seed: int = 0, conditioning: str = "adaLN-Zero", in_channels: int = 1, input_size: int = 8,
                    num_classes: int = 10, learn_sigma: bool = True) -> torch.nn.Module:
    """A tiny DiT (train mode) built under torch.manual_seed(seed), every weight then nudged by 0.05 N(0, 1):
    adaLN-Zero starts at exactly zero output, and the nudge makes labels and guidance matter."""
    from harness.models.dit import build_model

    torch.manual_seed(seed)
    model = build_model(TINY_MODEL, conditioning, input_size=input_size, in_channels=in_channels,
                        num_classes=num_classes, learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def final_state(run_dir, step: int) -> dict:
    from harness.models.checkpoint import checkpoint_path

    return torch.load(checkpoint_path(run_dir / "checkpoints", step), weights_only=True)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    """model, ema and optimizer state of two checkpoints are bitwise equal."""
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"opt.state[{i}].{k} differs"
    assert a["step"] == b["step"] and a["data_pos"] == b["data_pos"]


def free_port() -> int:
    """A TCP port free on localhost now, for a test's process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_rank(rank: int, world: int, port: int) -> None:
    """Inside a spawned test process: one intra-op thread and the torchrun-style environment of
    `rank` of `world` on localhost (the trainer reads it in harness.training.runtime.setup_distributed)."""
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


@contextlib.contextmanager
def tf32_off():
    """Both global TF32 switches off inside, restored after (monkeypatch cannot restore torch's cuBLAS module)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def assert_adam_close(a: dict, b: dict, lr: float, steps: int, grad_rel: float) -> float:
    """Two checkpoints trained from the same weights for `steps` AdamW steps whose gradients differ by
    `grad_rel` of each tensor's scale (another summation order) hold weights, EMA and first moments within
    `tolerance.adam_bound` of each other. Returns the worst error / bound (for the report)."""
    from tolerance import FP32_U, adam_bound, adam_grad_max, scale

    b1 = 0.9
    worst = 0.0
    for i, name in enumerate(b["model"]):
        w = b["model"][name]
        st = b["opt"]["state"].get(i)
        if st is None:  # never had a gradient (pos_embed): no step moved it
            assert torch.equal(a["model"][name], w) and torch.equal(a["ema"][name], b["ema"][name]), name
            continue
        bound = adam_bound(lr, steps, grad_rel, st["exp_avg_sq"], w)
        # EMA: a convex combination of the weights of steps 0..T (each within the bound at T), plus its own
        # 3 roundings a step on each side
        ema_bound = bound + steps * 6 * FP32_U * scale(b["ema"][name])
        # first moment: (1 - b1) sum_k b1^k g moves by <= (1 - b1^T) E, plus 3 roundings a step on each side
        m = st["exp_avg"]
        m_bound = (1 - b1 ** steps) * grad_rel * adam_grad_max(st["exp_avg_sq"], steps).max().item() \
            + steps * 6 * FP32_U * scale(m)
        for what, x, y, bd in (("model", a["model"][name], w, bound), ("ema", a["ema"][name], b["ema"][name], ema_bound),
                               ("exp_avg", a["opt"]["state"][i]["exp_avg"], m, m_bound)):
            err = (x.double() - y.double()).abs()
            ratio = (err / bd).max().item()
            assert ratio <= 1, f"{what}.{name}: error {err.max().item():.3g} over its bound (worst ratio {ratio:.3g})"
            worst = max(worst, ratio)
    return worst
