"""Run trials in fresh local processes, one or several at a time per GPU; store each result
as it lands, so an interrupt or a crash loses nothing that had finished."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue as queue_mod
import signal
import time
from typing import Callable

from bakeoff.runners import record_outcome, split_finished
from bakeoff.store import Store
from bakeoff.trial import TrialJob, trial_process_main

__all__ = ["run_local"]


class _Running:
    def __init__(self, job: TrialJob, ctx) -> None:
        self.job, self.queue, self.started = job, ctx.Queue(), time.time()
        self.proc = ctx.Process(target=trial_process_main, args=(job, self.queue), daemon=True)
        self.outcome: tuple[str, dict] | None = None
        self.dead_since: float | None = None
        # The child starts with Ctrl-C ignored: the parent alone handles it and stops the child,
        # so an interrupt prints one message, not a traceback from every process of the group.
        try:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
        try:
            self.proc.start()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def poll(self, on_event: Callable) -> bool:
        """Handle pending messages; True once the trial has an outcome."""
        while self.outcome is None:
            try:
                msg = self.queue.get_nowait()
            except queue_mod.Empty:
                break
            if msg[0] == "step":
                on_event("step", self.job, msg[2:])
            elif msg[0] == "result":
                self.outcome = ("ok", msg[2])
            elif msg[0] == "error":
                self.outcome = ("error", msg[2])
            elif msg[0] == "interrupted":
                raise KeyboardInterrupt
        if self.outcome is None and not self.proc.is_alive():
            # the last message may land just after the process ends: give it a moment
            self.dead_since = self.dead_since or time.time()
            if time.time() - self.dead_since > 2.0:
                code = self.proc.exitcode
                why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                hint = " (killed: out of memory?)" if code in (-9, 137) else ""
                self.outcome = ("error", {"error": f"trial process died with {why}{hint}", "traceback": ""})
        return self.outcome is not None

    def stop(self) -> None:
        self.proc.join(timeout=5 if self.outcome else 0)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()


def run_local(jobs: list[TrialJob], store: Store, run_id: int, on_event: Callable = lambda *a: None,
              devices: list[str] | None = None, per_device: int = 1) -> dict:
    """Train every job not already finished; a failure becomes a failed row and the run goes on.

    ``devices`` (e.g. ["cuda:0", "cuda:1"]) with ``per_device`` trials each run concurrently;
    by default one trial at a time on each job's own device. Returns counts: trained, resumed
    (finished before, skipped), failed.
    """
    ctx = mp.get_context("spawn")
    pending, counts = split_finished(jobs, store, on_event)
    slots = [d for d in (devices or [None]) for _ in range(max(1, per_device))]
    concurrent = len(slots) if devices else 1
    running: dict[int, _Running] = {}
    try:
        while pending or running:
            for slot in range(concurrent):
                if slot not in running and pending:
                    job = pending.pop(0)
                    if slots[slot] is not None:
                        job = dataclasses.replace(job, device=slots[slot],
                                                  extra=job.extra | {"concurrent_trials": concurrent})
                    on_event("start", job, None)
                    running[slot] = _Running(job, ctx)
            for slot, r in list(running.items()):
                if not r.poll(on_event):
                    continue
                r.stop()
                del running[slot]
                status, payload = r.outcome
                if status == "ok":
                    payload = payload | {"concurrent_trials": r.job.extra.get("concurrent_trials", 1)}
                record_outcome(store, run_id, r.job, r.started, status == "ok", payload, counts, on_event)
            time.sleep(0.05)
    finally:
        for r in running.values():
            r.stop()
    return counts
