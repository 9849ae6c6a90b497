"""Damage in a run folder that the harness can see cheaply, and repair of what it can rebuild.

`damage` (for `harness status`, cheap: no checkpoint is read) names what is wrong: a run.json that
does not parse or is not this run's record, a checkpoint without its checksum sidecar. `repair`
(for `harness sweep`, before it decides what to run) fixes it and says what it did:

- run.json is rewritten from the spec (its one writer, `layout.write_run_json`); nothing else in
  the folder depends on it, so checkpoints and evaluations are kept.
- a checkpoint without a sidecar is re-verified: it must load with `weights_only=True`, hold the
  step its name says, and have finite model and EMA weights; then its sidecar is written. (A file at
  its final name was renamed there only after a complete, fsynced write, so a crash between the
  rename and the sidecar, in a save or in slimming, is what this repairs; a flipped bit inside a
  tensor would not be caught.) A slim checkpoint (no optimizer state) passes like a whole one.
  Otherwise it is quarantined as `*.corrupt`; if it was the newest checkpoint of a finished run,
  `done` goes too, so the run trains again from its newest valid checkpoint (its evaluations stay).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from harness.config import layout
from harness.errors import HarnessError
from harness.cost.plan import record_run
from harness.config.spec import RunSpec

log = logging.getLogger(__name__)


def run_json_problem(run: RunSpec, rdir: Path) -> str | None:
    """Why rdir/run.json is not `run`'s record, or None (also None when there is none yet)."""
    path = layout.RunFolder(rdir).run_json
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            return "run.json is not a JSON object"
        if RunSpec.from_dict(record, path).run_id != run.run_id:
            return f"run.json is the record of run {record.get('run_id')!r}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"run.json is unreadable ({err})"
    except HarnessError as err:
        return f"run.json is malformed ({str(err).split(': ', 1)[-1].split('. Fix')[0]})"
    return None


def unsealed_checkpoints(rdir: Path) -> list[Path]:
    """Checkpoints without their checksum sidecar."""
    folder = layout.RunFolder(rdir)
    return [folder.checkpoint(s) for s in folder.checkpoint_steps()
            if not layout.sidecar_path(folder.checkpoint(s)).exists()]


def damage(run: RunSpec, rdir: Path) -> str | None:
    """What is wrong in the run folder, in a few words, or None."""
    problems = [p for p in [run_json_problem(run, rdir)] if p]
    problems += [f"{p.name} has no checksum file" for p in unsealed_checkpoints(rdir)]
    return "; ".join(problems) + " (`harness sweep` repairs it)" if problems else None


def repair(run: RunSpec, rdir: Path) -> list[str]:
    """Fix what `damage` finds; returns one line per thing done (also logged)."""
    from harness.models.checkpoint import reverify, seal_checkpoint  # torch: status reads damage without it

    folder, done = layout.RunFolder(rdir), []
    newest = max(folder.checkpoint_steps(), default=None)
    problem = run_json_problem(run, rdir)
    if problem:
        record_run(run, rdir)
        done.append(f"{run.run_id}: {problem}; rewrote it from the spec")
    for path in unsealed_checkpoints(rdir):
        why = reverify(path)
        if why is None:
            seal_checkpoint(path)
            done.append(f"{run.run_id}: {path.name} had no checksum file; it loads whole with its step and "
                        "finite weights, so its checksum was written")
            continue
        os.replace(path, path.with_name(path.name + ".corrupt"))
        line = f"{run.run_id}: {path.name} had no checksum file and {why}; quarantined as {path.name}.corrupt"
        if folder.done.exists() and layout.checkpoint_step(path.name) == newest:
            folder.done.unlink()
            line += "; the run trains again from its newest valid checkpoint"
        done.append(line)
    for line in done:
        log.warning("repaired %s", line)
    return done
