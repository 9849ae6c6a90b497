"""Training checkpoints: atomic save with a checksum, validation, newest-valid discovery, retention, slimming.

A checkpoint is a plain `torch.save` file `checkpoints/step_XXXXXXX.pt` holding a dict
{model, ema, opt, step, rng, data_pos, run} (so `torch.load(path)["ema"]` is a plain state dict),
next to a sidecar `step_XXXXXXX.pt.sha256` written atomically *after* the checkpoint. A checkpoint
counts as valid only if its sidecar exists, the file's SHA-256 matches it and `torch.load` succeeds;
a crash mid-save therefore never yields a checkpoint that is resumed, and a file truncated or
corrupted later is detected, logged and skipped in favour of the previous one. A failed write (a
full disk) leaves the previous checkpoint as the resume point and says so. Every load is
`torch.load(weights_only=True)`: the RNG states are tensors and plain values (harness.training.runtime), and
a file that carries a pickled callable is refused without running it (the sidecar only proves the
file is whole, not that it is ours).

Retention keeps the newest `train.keep_last` checkpoints and those at eval.at_steps. Under
`train.keep_optimizer: newest` (the default) an evaluated step's checkpoint that is no longer among the
newest is rewritten *slim*: the same dict without "opt" (AdamW's two moments, half a whole checkpoint's
bytes), with its sidecar rewritten to match. Only resuming needs "opt", and it resumes from the newest;
evaluation, sampling, export and `checkpoints_from` read the weights and EMA, which stay bitwise.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from harness.errors import HarnessError
from harness.io import atomic_write, atomic_write_text, sha256_file, unlink_durably
from harness.config.layout import checkpoint_name, checkpoint_step, sidecar_path

log = logging.getLogger(__name__)

#: test hook "STEP:SECONDS": stall that long halfway through writing the checkpoint of STEP
#: (simulates a slow save on a network file system, so a test can kill the process mid-write).
SLOW_SAVE_ENV = "HARNESS_TEST_SLOW_SAVE"


def _slow_save_seconds(step: int) -> float:
    hook = os.environ.get(SLOW_SAVE_ENV, "")
    if ":" not in hook:
        return 0.0
    at, seconds = hook.split(":", 1)
    return float(seconds) if int(at) == step else 0.0


#: test hook "STEP:POINT:SECONDS": stall that long while slimming the checkpoint of STEP, at POINT: "unsealed"
#: (old sidecar removed, slim copy written but not in place) or "replaced" (slim copy in place, no sidecar yet).
SLOW_SLIM_ENV = "HARNESS_TEST_SLOW_SLIM"


def _slim_stall(step: int, point: str) -> None:
    hook = os.environ.get(SLOW_SLIM_ENV, "").split(":")
    if len(hook) == 3 and int(hook[0]) == step and hook[1] == point:
        time.sleep(float(hook[2]))


def checkpoint_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / checkpoint_name(step)


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write `state` to checkpoints/step_XXXXXXX.pt atomically, then its checksum sidecar.

    The state is serialised to memory first, so the file on disk is written in one go and its
    checksum is that of exactly these bytes.
    """
    path = checkpoint_path(ckpt_dir, step)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    digest = hashlib.sha256(data).hexdigest()
    slow = _slow_save_seconds(step)

    def write(f: Any) -> None:
        if slow > 0:  # test hook: write half, stall, write the rest
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            time.sleep(slow)
            f.write(data[half:])
        else:
            f.write(data)

    try:
        atomic_write(path, write, mode="wb")  # on failure the temp file is removed, `path` untouched
    except OSError as err:
        # the newest complete checkpoint up to this step (one at this very step, if a rewrite failed)
        older = [p.name for s, p in list_checkpoints(ckpt_dir) if s <= step and sidecar_path(p).exists()]
        keep = f"the checkpoint {older[-1]} stays the resume point" if older else "no earlier checkpoint"
        raise HarnessError(f"{path}: could not write the checkpoint ({err.strerror or err}); {keep}. Fix: free "
                           "space on that file system (or move results/), then run the same command again.") from err
    atomic_write_text(sidecar_path(path), f"{digest}  {path.name}\n")
    log.info("saved checkpoint %s (%.1f MB)", path, len(data) / 2**20)
    return path


def seal_checkpoint(path: Path) -> None:
    """Write the sidecar of a checkpoint whose wholeness was established otherwise (harness.launch.repair)."""
    atomic_write_text(sidecar_path(path), f"{sha256_file(path)}  {path.name}\n")


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every step_*.pt in the folder, oldest first (validity not checked)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        step = checkpoint_step(p.name)
        if step is not None and p.is_file():
            found.append((step, p))
    return sorted(found)


def verify_checkpoint(path: str | Path) -> str | None:
    """None if the checkpoint's checksum sidecar exists and matches; else the reason it is invalid."""
    path = Path(path)
    side = sidecar_path(path)
    if not side.exists():
        return f"no checksum file {side.name} (the save did not finish)"
    text = side.read_text().split()
    want = text[0] if text else ""
    got = sha256_file(path)
    if got != want:
        return f"checksum mismatch (file {got[:12]}..., recorded {want[:12]}...): truncated or corrupt"
    return None


def _first_line(err: BaseException) -> str:
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    return lines[0] if lines else type(err).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint after verifying its checksum; raises ValueError naming the problem."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem:
        raise ValueError(f"{path}: {problem}")
    try:  # weights_only: tensors and plain values; a pickled callable is refused, never run
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            foreign = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or _first_line(err)
        except Exception as not_zip:  # noqa: BLE001 - not a torch.save archive at all: unusable, not hostile
            raise ValueError(f"{path}: torch.load failed: {_first_line(not_zip)}") from err
        raise ValueError(f"{path}: refused: it holds Python objects beyond tensors and plain values, which "
                         f"could run code when loaded ({foreign}); it was not loaded") from err
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise ValueError(f"{path}: torch.load failed: {_first_line(err)}") from err
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise ValueError(f"{path}: not a harness training checkpoint (missing 'step'/'model')")
    return state


def load_latest_valid(ckpt_dir: str | Path, map_location: str | torch.device = "cpu",
                      quarantine: bool = True) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that verifies and loads, or None. Invalid newer ones are logged and,
    with `quarantine`, renamed to `*.corrupt` so that retention and later resumes ignore them."""
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return load_checkpoint(path, map_location), path
        except ValueError as err:
            log.warning("skipping invalid checkpoint: %s", err)
            if quarantine:
                try:
                    os.replace(path, path.with_name(path.name + ".corrupt"))
                    sidecar_path(path).unlink(missing_ok=True)
                except OSError as move_err:
                    log.warning("could not quarantine %s: %s", path, move_err)
    return None


def clean_partial_writes(ckpt_dir: str | Path) -> int:
    """Remove temp files left by a save that was killed (`.step_XXXXXXX.pt.*.tmp`). Returns count."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return 0
    n = 0
    for p in ckpt_dir.glob(".step_*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    if n:
        log.info("removed %d partial checkpoint write(s) in %s", n, ckpt_dir)
    return n


def reverify(path: Path) -> str | None:
    """For a checkpoint found without its sidecar: None if it loads whole (weights_only), holds the step of its
    name and finite model and EMA weights; else why not. (A file at its final name was renamed there only after a
    complete, fsynced write; a flipped bit inside a tensor would not be caught.)"""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to load means the file is unusable
        return f"does not load ({_first_line(err)})"
    if not isinstance(state, dict) or not {"model", "ema", "step"} <= set(state):
        return "not a harness training checkpoint"
    if int(state["step"]) != checkpoint_step(path.name):
        return f"holds step {state['step']}, not the step of its name"
    for key in ("model", "ema"):
        if not all(torch.isfinite(t).all() for t in state[key].values() if t.is_floating_point()):
            return f"its {key} weights are not finite"
    return None


def slim_checkpoint(path: Path) -> bool:
    """Rewrite a checkpoint without its optimizer state ("opt"); everything else stays, bitwise. False if it has
    none (already slim); ValueError if it does not verify (then it is left as it is).

    The slim copy goes to a temporary file; the old sidecar is removed (durably), the copy fsynced and renamed
    into place, then the new sidecar written. A crash in between leaves a complete file, whole or slim, without
    a sidecar, which `reverify` passes (`harness sweep`'s repair, or the next `slim_old_checkpoints`, seals it):
    the file never sits beside a sidecar that does not match it.
    """
    try:  # mmap: asking whether it is slim already reads the small pickle, not the tensors
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise ValueError(f"{path}: torch.load failed: {_first_line(err)}") from err
    if "opt" not in state:
        return False
    problem = verify_checkpoint(path)
    if problem:
        raise ValueError(f"{path}: {problem}")
    buf = io.BytesIO()
    torch.save({k: v for k, v in state.items() if k != "opt"}, buf)
    del state
    data, step, side = buf.getbuffer(), checkpoint_step(path.name), sidecar_path(path)

    def write(f: Any) -> None:
        f.write(data)
        unlink_durably(side)  # unsealed from here to the new sidecar (never mismatched)
        _slim_stall(step, "unsealed")

    try:
        atomic_write(path, write, mode="wb")
        _slim_stall(step, "replaced")
        atomic_write_text(side, f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    except OSError:
        if not side.exists() and reverify(path) is None:  # the file in place is whole or slim: seal it again
            seal_checkpoint(path)
        raise
    return True


def slim_old_checkpoints(ckpt_dir: str | Path, keep_last: int, keep_steps: Iterable[int]) -> list[Path]:
    """Slim (`slim_checkpoint`) the checkpoints at `keep_steps` that are not among the newest `keep_last`; one a
    crash left without its sidecar mid-slimming is first re-verified and sealed. Housekeeping, never fatal: a
    checkpoint that cannot be slimmed is logged and kept as it is. Returns the paths slimmed."""
    if keep_last < 1:
        return []
    found = list_checkpoints(ckpt_dir)
    newest = {step for step, _ in found[-keep_last:]}
    keep = set(int(s) for s in keep_steps)
    slimmed = []
    for step, path in found:
        if step in newest or step not in keep:
            continue
        try:
            if not sidecar_path(path).exists():
                why = reverify(path)
                if why:
                    raise ValueError(f"{path}: no checksum file, and it {why} (`harness sweep` quarantines it)")
                seal_checkpoint(path)
                log.warning("%s had no checksum file (a slimming cut short?); it loads whole with its step and "
                            "finite weights, so its checksum was written", path)
            if slim_checkpoint(path):
                slimmed.append(path)
        except (ValueError, OSError) as err:
            log.warning("kept %s as it is, not slimmed: %s", path.name, err)
    if slimmed:
        log.info("dropped the optimizer state of %s (train.keep_optimizer: newest)",
                 ", ".join(p.name for p in slimmed))
    return slimmed


def apply_retention(ckpt_dir: str | Path, keep_last: int, keep_steps: Iterable[int] = (),
                    keep_optimizer: str = "all") -> list[Path]:
    """Delete checkpoints other than the newest `keep_last` and those at `keep_steps`; with `keep_optimizer`
    "newest" (train.keep_optimizer), slim those at `keep_steps` not among the newest (`slim_old_checkpoints`).

    Returns the deleted paths. `keep_last` < 1 keeps everything, whole.
    """
    if keep_last < 1:
        return []
    keep = set(int(s) for s in keep_steps)
    all_ckpts = list_checkpoints(ckpt_dir)
    newest = {step for step, _ in all_ckpts[-keep_last:]}
    deleted = []
    for step, path in all_ckpts:
        if step in newest or step in keep:
            continue
        path.unlink(missing_ok=True)
        sidecar_path(path).unlink(missing_ok=True)
        deleted.append(path)
    if deleted:
        log.info("retention removed %s", ", ".join(p.name for p in deleted))
    if keep_optimizer == "newest":
        slim_old_checkpoints(ckpt_dir, keep_last, keep)
    return deleted
