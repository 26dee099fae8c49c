"""Run trials one after another, each in a fresh process; store each result as it lands."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import signal
import time
from typing import Callable

from bakeoff.store import Store
from bakeoff.trial import TrialJob, trial_process_main

__all__ = ["run_local"]


def _run_one(job: TrialJob, ctx, on_event: Callable) -> tuple[str, dict]:
    q = ctx.Queue()
    proc = ctx.Process(target=trial_process_main, args=(job, q), daemon=True)
    # The child starts with Ctrl-C ignored: the parent alone handles it and stops the child, so
    # an interrupt prints one message, not a traceback from every process of the group.
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        proc.start()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    outcome: tuple[str, dict] | None = None
    try:
        while outcome is None:
            try:
                msg = q.get(timeout=0.2)
            except queue_mod.Empty:
                if not proc.is_alive():
                    try:  # the last message may land just after the process ends
                        msg = q.get(timeout=1.0)
                    except queue_mod.Empty:
                        code = proc.exitcode
                        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                        hint = " (killed: out of memory?)" if code in (-9, 137) else ""
                        outcome = ("error", {"error": f"trial process died with {why}{hint}", "traceback": ""})
                        break
                else:
                    continue
            kind = msg[0]
            if kind == "step":
                on_event("step", job, msg[2:])
            elif kind == "result":
                outcome = ("ok", msg[2])
            elif kind == "error":
                outcome = ("error", msg[2])
            elif kind == "interrupted":
                raise KeyboardInterrupt
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return outcome


def run_local(jobs: list[TrialJob], store: Store, run_id: int, on_event: Callable = lambda *a: None) -> dict:
    """Train every job not already finished; a failure becomes a failed row and the run goes on.

    Returns counts: trained, resumed (skipped because finished before), failed.
    """
    ctx = mp.get_context("spawn")
    done = store.finished_keys()
    counts = {"trained": 0, "resumed": 0, "failed": 0}
    for job in jobs:
        if job.key in done:
            counts["resumed"] += 1
            on_event("resumed", job, None)
            continue
        on_event("start", job, None)
        started = time.time()
        status, payload = _run_one(job, ctx, on_event)
        if status == "ok":
            store.save_trial(job.key, run_id, job.spec["id"], job.spec["framework"], "ok", started, result=payload)
            counts["trained"] += 1
            on_event("done", job, payload)
        else:
            store.save_trial(job.key, run_id, job.spec["id"], job.spec["framework"], "failed", started,
                             error=payload["error"], traceback=payload.get("traceback"))
            counts["failed"] += 1
            on_event("failed", job, payload)
    return counts
