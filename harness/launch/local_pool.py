"""The local launcher's process pool: at most `launcher.max_concurrent_local` submitit local jobs at
a time, a progress bar over their training steps, and a clean stop (children cancelled, the reason
recorded, checkpoints kept) on Ctrl-C, SIGTERM or SIGHUP."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.config import layout
from harness.launch.job import SweepJob
from harness.config.spec import SweepSpec
from harness.launch.status import POLL_S, RunStatus, record_outcome, train_progress

log = logging.getLogger(__name__)


class SweepStopped(SystemExit):
    """SIGTERM/SIGHUP reached `harness sweep` (`kill PID`, a closed terminal): stop like Ctrl-C."""


@contextlib.contextmanager
def _stop_on_term() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception while local jobs run, so their cleanup (stopping
    the child jobs, recording why) runs; Python's default would exit without it and leave orphans."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise SweepStopped(128 + signum)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started in the background (`nohup ... &`): the local jobs would inherit an ignored SIGINT,
        # and submitit cancels a local job with SIGINT -- they would keep training after we stop
        old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_local(ex: Any, spec: SweepSpec, todo: list[RunStatus], args: list[tuple], record: Callable,
              state: dict, sdir: Path) -> None:
    """Run `todo` (with their SweepJob arguments `args`) through the local executor `ex`;
    `record(status, job)` notes each submission in `state`, saved to `sdir` as jobs start and end."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    queue = list(zip(todo, args))
    running: dict[str, Any] = {}
    # a progress bar over the training steps of this dispatch (shown on a terminal only)
    with _stop_on_term(), logging_redirect_tqdm(), tqdm(total=sum(s.run.train.steps for s in todo), unit="step",
                                                        desc=f"sweep {spec.name}", disable=None) as bar:
        def progress() -> None:
            bar.n = sum(min(train_progress(s.dir), s.run.train.steps) for s in todo)
            bar.set_postfix_str(f"{sum(layout.RunFolder(s.dir).done.exists() for s in todo)}/{len(todo)} runs done")

        _loop(ex, spec, queue, running, record, state, sdir, progress)
        progress()


def _loop(ex: Any, spec: SweepSpec, queue: list, running: dict[str, Any], record: Callable,
          state: dict, sdir: Path, progress: Callable[[], None]) -> None:
    try:
        while queue or running:
            progress()
            while queue and len(running) < spec.launcher.max_concurrent_local:
                s, a = queue.pop(0)
                job = ex.submit(SweepJob(spec.launcher.cpus_per_task), *a)
                record(s, job)
                layout.save_state(sdir, state)
                running[s.run.run_id] = job
                log.info("%s: started local job %s", s.run.run_id, job.job_id)
            for run_id, job in list(running.items()):
                if job.done():
                    record_outcome(run_id, job, state, job.state)
                    del running[run_id]
                    layout.save_state(sdir, state)
            if running:
                time.sleep(min(POLL_S, 1.0))
    except BaseException:
        for run_id, job in running.items():  # interrupted: stop our children; checkpoints stay
            with contextlib.suppress(Exception):
                job.cancel(check=False)
            state["runs"][run_id]["reason"] = "interrupted: harness sweep was stopped"
        deadline = time.monotonic() + 15  # submitit's controller SIGKILLs a task 1 s after SIGINT
        for job in running.values():
            with contextlib.suppress(Exception):
                while not job.done() and time.monotonic() < deadline:
                    time.sleep(0.1)
        raise
