"""Run trials in local worker processes, one per GPU (or one for the CPU); store each result
as it lands, so an interrupt or a crash loses nothing that had finished. A worker runs PyTorch
trials one after another, or several at once on their own CUDA streams, and keeps the decoded
images resident between them; after a failure or a Keras trial it ends, and the next trial gets
a fresh process. Keras trials, a process each, may share a GPU with each other (not with a
PyTorch worker) through the lock files of ``process_gate``."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import signal
import tempfile
import time
from typing import Callable

from bakeoff.engines import engine_for
from bakeoff.gpu_share import send_signal
from bakeoff.lifetime import die_with_parent
from bakeoff.runners import record_outcome, split_finished
from bakeoff.store import Store
from bakeoff.timing import background_pids
from bakeoff.job import TrialJob
from bakeoff.trial import reusable_after, worker_main

__all__ = ["run_local", "prestart"]


DIED = "trial process died"


def _child_main(target: Callable, parent: int, *args) -> None:
    """A worker's first act: tie its life to the run's process. ``daemon=True`` stops it only
    when the run exits normally; a run killed outright (out of memory, SIGKILL) would leave it
    training and writing into the output folder that the next run owns."""
    die_with_parent(parent)
    target(*args)


class _Worker:
    """A trial process that runs up to ``capacity`` jobs at once, and job after job: later
    trials on the same data reuse the images it keeps resident, and skip the process start and
    the data load."""

    def __init__(self, ctx, capacity: int = 1, prewarm: str | None = None, target: Callable = worker_main) -> None:
        self.capacity = capacity
        self.jobs, self.queue = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_child_main, args=(target, os.getpid(), self.jobs, self.queue, capacity,
                                                          prewarm), daemon=True)
        self.running: dict[str, tuple[TrialJob, float]] = {}
        self.closing = False  # takes no more jobs; stopped once its running ones finish
        self.told_last = False  # told that no more trials will join the ones it runs
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

    def adopt(self, capacity: int) -> "_Worker":
        """Set the capacity of a worker started before it was known (see ``prestart``)."""
        self.capacity = capacity
        self.jobs.put(("capacity", capacity))
        return self

    def last_wave(self) -> None:
        """No trial will join the ones this worker runs: from now on they keep pace with each
        other (``GpuShare.pacing``), so that they end together. Before, a trial that ends early
        frees its place for the next one, and holding it back would only slow that one."""
        if not self.told_last and self.capacity > 1 and self.proc.is_alive():
            self.jobs.put(("last", True))
            self.told_last = True

    def has_room(self) -> bool:
        return not self.closing and len(self.running) < self.capacity and self.proc.is_alive()

    def give(self, job: TrialJob) -> None:
        self.running[job.key] = (job, time.time())
        self.jobs.put(job)

    def poll(self, on_event: Callable) -> list[tuple[TrialJob, float, str, dict]]:
        """Handle pending messages; returns the trials that ended: (job, started, status, payload)."""
        ended = []
        while self.running:
            try:
                msg = self.queue.get_nowait()
            except queue_mod.Empty:
                break
            if msg[1] not in self.running:
                continue
            if msg[0] == "step":
                on_event("step", self.running[msg[1]][0], msg[2:])
            elif msg[0] == "interrupted":
                raise KeyboardInterrupt
            elif msg[0] in ("result", "error", "alone"):
                job, started = self.running.pop(msg[1])
                status = {"result": "ok", "error": "error"}.get(msg[0], "alone")
                ended.append((job, started, status, msg[2]))
                if status != "ok" or not reusable_after(job):
                    self.closing = True
        if self.running and not self.proc.is_alive():
            # the last messages may land just after the process ends: give them a moment
            self.dead_since = self.dead_since or time.time()
            if time.time() - self.dead_since > 2.0:
                code = self.proc.exitcode
                why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                hint = " (killed: out of memory?)" if code in (-9, 137) else ""
                error = {"error": f"{DIED} with {why}{hint}", "traceback": ""}
                ended += [(job, started, "error", error) for job, started in self.running.values()]
                self.running.clear()
                self.closing = True
        return ended

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


def _own_process(job: TrialJob) -> bool:
    """A Keras trial, or one that could not share its GPU: it runs alone in a fresh process."""
    return not engine_for(job.spec["framework"]).shares_process or job.alone


def _shareable(jobs: list[TrialJob]) -> int:
    """How many of ``jobs`` may share a worker (and its GPU) with other trials."""
    return sum(not _own_process(j) for j in jobs)


def prestart(device: str, target: Callable = worker_main) -> _Worker:
    """A worker started now, while the images are still being decoded: importing torch and
    starting CUDA (seconds) then overlap that work instead of delaying the first trial. Hand it
    to ``run_local(warm=...)``, which stops it if it goes unused."""
    return _Worker(mp.get_context("spawn"), prewarm=device, target=target)


def _beside_each_other(job: TrialJob) -> bool:
    """A trial that runs in a process of its own and may share its GPU with others like it."""
    return not engine_for(job.spec["framework"]).shares_process and not job.alone


# GPU memory a trial in a process of its own is budgeted beside its copy of the images: the
# study's largest Keras model peaked at 3.4 GB at batch 16 (docs/results.md), plus the contexts.
PROCESS_MODEL_BYTES = 6 * 2**30


def _gpu_bytes(job: TrialJob) -> int:
    """What a trial in a process of its own holds on its GPU: its images at its model's side, and the model."""
    side = job.side or job.input_size
    return (len(job.train_idx) + len(job.val_idx)) * side * side * 3 + PROCESS_MODEL_BYTES


def run_local(jobs: list[TrialJob], store: Store, run_id: int, on_event: Callable = lambda *a: None,
              devices: list[str] | None = None, per_device: int = 1, warm: _Worker | None = None,
              target: Callable = worker_main, processes_per_device: int = 1, gpu_memory: int | None = None) -> dict:
    """Train every job not already finished; a failure becomes a failed row and the run goes on.

    ``devices`` (e.g. ["cuda:0", "cuda:1"]): one worker each, running ``per_device`` PyTorch
    trials at once on their own CUDA streams; by default one trial at a time on each job's own
    device. Keras trials run in a fresh process each, up to ``processes_per_device`` at once on
    a GPU, as many as ``gpu_memory`` (bytes free on each) holds (``_gpu_bytes``), after the
    PyTorch trials, never beside them; a trial that could not share its GPU
    (sent back by its worker: ``job.RunAlone``) or failed while sharing it runs again alone.
    Returns counts: trained, resumed (finished before, skipped), failed. ``target``: the
    worker's main function (tests stand in their own).
    """
    ctx = mp.get_context("spawn")
    pending, counts = split_finished(jobs, store, on_event)
    # Trials wanting the same stored image size run one after another, so a worker's resident
    # images serve the next trial too; Keras trials (a fresh process each) come last.
    pending.sort(key=lambda j: (not engine_for(j.spec["framework"]).shares_process, j.side or 0))
    slots = devices or [None]
    share = max(1, per_device) if devices else 1
    # No more places per GPU than trials to fill them: a trial sharing with nobody is measured,
    # not projected.
    shareable = _shareable(pending)
    share = max(1, min(share, -(-shareable // len(slots))))
    own = [j for j in pending if _beside_each_other(j)]
    fit = gpu_memory // min(map(_gpu_bytes, own)) if own and gpu_memory else processes_per_device
    crowd = max(1, min(processes_per_device, fit, -(-len(own) // len(slots)))) if devices else 1
    gates = tempfile.mkdtemp(prefix="bakeoff-gpu-") if crowd > 1 else None
    workers: dict[int, _Worker] = {}
    beside: dict[int, list[_Worker]] = {slot: [] for slot in range(len(slots))}  # own processes sharing a GPU
    # A started process waiting for each slot's next trial: the first one the caller's (started
    # while the images decoded), later ones started while a trial that ends its process trains.
    spares: dict[int, _Worker] = {0: warm} if warm is not None else {}

    def of_slot(slot: int) -> list[_Worker]:
        return ([workers[slot]] if slot in workers else []) + beside[slot]

    try:
        while pending or any(w.running for slot in beside for w in of_slot(slot)):
            for slot, device in enumerate(slots):
                w = workers.get(slot)
                if w is not None and not w.running and (w.closing or not w.proc.is_alive()):
                    w.stop(wait=5.0)  # the next job gets a fresh process
                    del workers[slot]
                    w = None
                for p in [p for p in beside[slot] if not p.running]:
                    p.stop(wait=5.0)
                    beside[slot].remove(p)
                while pending:
                    job = pending[0]
                    one_process_each = not engine_for(job.spec["framework"]).shares_process
                    alone = _own_process(job)
                    if crowd > 1 and _beside_each_other(job):
                        if w is not None:  # the PyTorch worker ends first: it does not take part in their gate
                            if w.running:
                                break
                            w.stop(wait=5.0)
                            del workers[slot]
                            w = None
                        held = sum(_gpu_bytes(next(iter(p.running.values()))[0]) for p in beside[slot])
                        if len(beside[slot]) >= crowd or (
                                beside[slot] and gpu_memory and held + _gpu_bytes(job) > gpu_memory):
                            break
                        pending.pop(0)
                        p = _Worker(ctx, 1, target=target)
                        p.closing = True
                        job = dataclasses.replace(job, concurrent_trials=crowd, device=device or job.device,
                                                  gpu_gate=os.path.join(gates, f"gpu{slot}"))
                        on_event("start", job, None)
                        p.give(job)
                        beside[slot].append(p)
                        continue
                    if beside[slot]:  # anything else has the GPU without them
                        break
                    if alone and w is not None and (one_process_each or w.capacity > 1):
                        # a Keras trial, or one that could not share the GPU: a process of its own
                        if w.running:
                            break
                        w.stop(wait=5.0)
                        del workers[slot]
                        w = None
                    if w is None:
                        if slot in spares and not alone:
                            w = spares.pop(slot).adopt(share)
                        else:
                            w = _Worker(ctx, 1 if alone else share, target=target)
                        workers[slot] = w
                    if not w.has_room():
                        break
                    pending.pop(0)
                    job = dataclasses.replace(job, keep_data=True, concurrent_trials=w.capacity,
                                              device=device or job.device)
                    on_event("start", job, None)
                    w.give(job)
                    if one_process_each:
                        w.closing = True
                    elif (slot not in spares and str(job.device).startswith("cuda") and not reusable_after(job)
                          and _shareable(pending)):
                        spares[slot] = prestart(job.device, target)
            if not _shareable(pending):
                for w in workers.values():
                    w.last_wave()
            for slot, w in [(slot, w) for slot in beside for w in of_slot(slot)]:
                for job, started, status, payload in w.poll(on_event):
                    if status == "error" and payload["error"].startswith(DIED):
                        # It may have died alone on the GPU: what it stopped for that goes on (the
                        # run's background compiles, the processes beside it).
                        send_signal(background_pids(job.background, job.compile)
                                    + [p.proc.pid for p in beside[slot] if p is not w and p.proc.is_alive()], "SIGCONT")
                    if status == "error" and (w.capacity > 1 or job.gpu_gate) and not job.alone:
                        # A trial that failed beside others (out of memory, a neighbour's crash
                        # that ended the process) runs again alone: the error it keeps is its own.
                        status, payload = "alone", f"failed beside other trials: {payload['error']}"
                    if status == "alone":  # first in line for a process of its own
                        pending.insert(0, dataclasses.replace(job, alone=True, shared_gpu_error=payload,
                                                              gpu_gate=None, concurrent_trials=1))
                        continue
                    if status == "ok":
                        payload = payload | {"concurrent_trials": job.concurrent_trials}
                    record_outcome(store, run_id, job, started, status == "ok", payload, counts, on_event)
            time.sleep(0.05)
    finally:
        for w in [*spares.values(), *(w for slot in beside for w in of_slot(slot))]:
            w.stop(wait=0.0 if w.running else 5.0)
        if gates:
            shutil.rmtree(gates, ignore_errors=True)
    return counts
