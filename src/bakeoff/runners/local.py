"""Run trials in local worker processes, one or several at a time per GPU; store each result
as it lands, so an interrupt or a crash loses nothing that had finished. A worker runs one
PyTorch trial after another and keeps the decoded images resident between them; after a
failure or a Keras trial it ends, and the next trial gets a fresh process."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue as queue_mod
import signal
import time
from typing import Callable

from bakeoff.runners import record_outcome, split_finished
from bakeoff.store import Store
from bakeoff.trial import TrialJob, reusable_after, worker_main

__all__ = ["run_local"]


class _Worker:
    """A trial process that runs one job after another: later trials on the same data reuse
    the images it keeps resident, and skip the process start and the data load."""

    def __init__(self, ctx) -> None:
        self.jobs, self.queue = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=worker_main, args=(self.jobs, self.queue), daemon=True)
        self.job: TrialJob | None = None
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

    def give(self, job: TrialJob) -> None:
        self.job, self.started, self.outcome, self.dead_since = job, time.time(), None, None
        self.jobs.put(job)

    def poll(self, on_event: Callable) -> bool:
        """Handle pending messages; True once the current trial has an outcome."""
        while self.outcome is None:
            try:
                msg = self.queue.get_nowait()
            except queue_mod.Empty:
                break
            if msg[1] != self.job.key:
                continue
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

    def reusable(self) -> bool:
        """Whether the worker takes another job (it ends itself after failures and Keras trials)."""
        return self.outcome is not None and self.outcome[0] == "ok" and reusable_after(self.job) \
            and self.proc.is_alive()

    def stop(self, wait: float = 5.0) -> None:
        if self.proc.is_alive():
            try:
                self.jobs.put(None)
            except (OSError, ValueError):
                pass
        self.proc.join(timeout=wait)
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
    # Trials wanting the same stored image size run one after another, so a worker's resident
    # images serve the next trial too; Keras trials (a fresh process each) come last.
    pending.sort(key=lambda j: (j.spec["framework"] != "pytorch", j.side or 0))
    slots = [d for d in (devices or [None]) for _ in range(max(1, per_device))]
    concurrent = len(slots) if devices else 1
    workers: dict[int, _Worker] = {}
    busy: set[int] = set()
    try:
        while pending or busy:
            for slot in range(concurrent):
                if slot not in busy and pending:
                    job = pending.pop(0)
                    extra = job.extra | {"keep_data": True}
                    if slots[slot] is not None:
                        extra |= {"concurrent_trials": concurrent}
                        job = dataclasses.replace(job, device=slots[slot])
                    job = dataclasses.replace(job, extra=extra)
                    on_event("start", job, None)
                    if slot not in workers:
                        workers[slot] = _Worker(ctx)
                    workers[slot].give(job)
                    busy.add(slot)
            for slot in list(busy):
                w = workers[slot]
                if not w.poll(on_event):
                    continue
                busy.discard(slot)
                if not w.reusable():
                    w.stop(wait=5.0 if w.outcome[0] == "ok" else 0.0)
                    del workers[slot]
                status, payload = w.outcome
                if status == "ok":
                    payload = payload | {"concurrent_trials": w.job.extra.get("concurrent_trials", 1)}
                record_outcome(store, run_id, w.job, w.started, status == "ok", payload, counts, on_event)
            time.sleep(0.05)
    finally:
        for w in workers.values():
            w.stop(wait=5.0 if not busy else 0.0)
    return counts
