"""A run's model: the one place a `RunSpec` becomes a DiT, and the one place a training checkpoint does.

`build_run_model(run)` builds the architecture a run names (model, block, the data's channels and
input side, classes, label dropout); the trainer, `train.init_from`'s check, export and `harness
sample` all build through it. `model_from_checkpoint(path)` reads a training checkpoint
{model, ema, step, run, ...}: its run record through `RunSpec.from_dict` (a checkpoint's record needs
only its model; what it lacks takes the spec's defaults), the model from that run, the EMA (or raw)
weights loaded into it. `harness.models.dit.build_model` stays the constructor by registry name, for
callers that have no run (`harness bench`, the tests).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.config.spec import RunSpec
from harness.errors import HarnessError
from harness.models.checkpoint import load_checkpoint
from harness.models.dit import DiT, build_model


def build_run_model(run: RunSpec, device: str | torch.device = "cpu") -> DiT:
    """The DiT `run` trains: its model and block, the data's channels and input side, its classes and label dropout."""
    d = run.data
    return build_model(run.model, run.conditioning, input_size=d.input_size, in_channels=d.channels,
                       num_classes=d.num_classes, class_dropout_prob=run.train.class_dropout).to(device)


def checkpoint_run(state: dict[str, Any], path: str | Path) -> RunSpec:
    """The RunSpec of a loaded checkpoint's "run" record; HarnessError if it has none to rebuild the model from."""
    record = state.get("run")
    if not isinstance(record, dict) or "model" not in record:
        raise HarnessError(f"{path}: the checkpoint has no 'run' dict (run.json), so the model cannot be rebuilt.")
    return RunSpec.from_dict(record, f"{path} (its run record)", required=("model",))


def strip_wrappers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without DDP's `module.` and torch.compile's `_orig_mod.` prefixes."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}


def model_from_checkpoint(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu", *,
                          arg: str = "--checkpoint", raw_flag: str = "--no-ema") -> tuple[DiT, RunSpec, dict]:
    """(the run's model with the checkpoint's EMA (or raw) weights, in eval mode on `device`; its RunSpec;
    the checkpoint). Errors are one HarnessError naming the file and the command's `arg` and `raw_flag`."""
    path = Path(path)
    if not path.exists():
        raise HarnessError(f"{path}: no such checkpoint ({arg}); checkpoints live in "
                           "results/<sweep>/runs/<run_id>/checkpoints/step_XXXXXXX.pt.")
    try:
        state = load_checkpoint(path, map_location="cpu")
    except ValueError as err:
        raise HarnessError(f"{err} ({arg}); pick another checkpoint of the run.") from err
    run = checkpoint_run(state, path)
    weights = state.get("ema") if use_ema else state["model"]
    if weights is None:
        raise HarnessError(f"{path}: the checkpoint has no EMA weights; pass {raw_flag} to use the raw weights.")
    model = build_run_model(run)
    try:
        model.load_state_dict(strip_wrappers(weights))
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise HarnessError(f"{path}: its weights do not fit the {run.model} ({run.conditioning}) its run record "
                           f"names ({first}).") from None
    return model.to(device).eval(), run, state
