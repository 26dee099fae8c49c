"""Trials in processes of their own sharing one GPU (scheduling): Keras trials, a process each.

The in-process gate (``gpu_share.GpuShare``) cannot reach another process, so the processes of
one GPU share it through two lock files (``flock``). A process launching GPU work holds the main
lock shared, across its steps; one that times alone holds it exclusive. A process that wants to
be alone first takes the turnstile, which every shared holder looks at before each piece of work
(``shared``): when someone waits there, the holder finishes its queued GPU work (``drain``) and
lets go, and new ones wait at the turnstile. So a solo section waits for at most one step of
each neighbour, and no neighbour's work is queued on the device while it runs. Neighbours off
the lock meanwhile (compiling, building, saving, waiting) are stopped for the solo section: a
batch-16 step or a batch-1 call is host-bound, and their cores' work read as 20-110% slower
steps and latencies beside four XLA compiles. A process marks itself off the lock in a folder
beside the lock files (its process id and start time, so an id reused after a crash is never
stopped; Linux: elsewhere nobody is stopped). The kernel drops a dead process's locks: a
neighbour that crashed never blocks the rest. POSIX only (fcntl).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from bakeoff.gpu_share import GpuShare, send_signal
from bakeoff.lifetime import started_at

__all__ = ["ProcessGate"]


class ProcessGate(GpuShare):
    """One process's side of the GPU it shares with the processes given the same ``path``, of
    ``trials`` in all. ``drain`` waits for this process's GPU work queued so far (called before
    it lets go). Background processes kept out (``keeping_out``) and the time alone and waiting
    (``alone``, ``waited``) are the in-process gate's."""

    def __init__(self, path: str, drain: Callable[[], None] = lambda: None, trials: int = 2) -> None:
        super().__init__(trials)
        self.drain = drain
        self._main = open(f"{path}.lock", "a+b")
        self._turn = open(f"{path}.turn", "a+b")
        self._off = Path(f"{path}.off")  # processes off the lock: stopped while one is alone
        self._off.mkdir(exist_ok=True)
        self._mark = self._off / str(os.getpid())
        self._mark_off(True)
        atexit.register(self._mark_off, False)
        self._holding = False  # the main lock, shared
        self._alone = False  # inside our own exclusive section

    def close(self) -> None:
        self._mark_off(False)
        self._main.close()
        self._turn.close()

    def _mark_off(self, off: bool) -> None:
        if off:
            self._mark.write_text(started_at(os.getpid()) or "")
        else:
            self._mark.unlink(missing_ok=True)

    def _neighbours_off(self) -> list[int]:
        """The other processes off the lock now, as they marked themselves (the same process)."""
        pids = []
        for mark in self._off.iterdir():
            try:
                pid = int(mark.name)
                started = mark.read_text()
            except (ValueError, OSError):
                continue
            if pid != os.getpid() and started and started_at(pid) == started:
                pids.append(pid)
        return pids

    def _someone_waits(self) -> bool:
        try:
            fcntl.flock(self._turn, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._turn, fcntl.LOCK_UN)
        return False

    def _let_go(self) -> None:
        self.drain()
        self._mark_off(True)  # before the lock goes: whoever is alone next sees the mark
        fcntl.flock(self._main, fcntl.LOCK_UN)
        self._holding = False

    def _hold(self) -> None:
        t0 = time.perf_counter()
        fcntl.flock(self._turn, fcntl.LOCK_SH)  # waits while another process is (about to be) alone
        fcntl.flock(self._main, fcntl.LOCK_SH)
        fcntl.flock(self._turn, fcntl.LOCK_UN)
        self._mark_off(False)
        self._holding = True
        self._add_wait(time.perf_counter() - t0)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """A piece of GPU work beside the other processes' (a step, a batch). The lock is kept
        after it, for the next piece, unless a process waits to be alone."""
        if not self._alone:
            if self._holding and self._someone_waits():
                self._let_go()
            if not self._holding:
                self._hold()
        yield

    def idle(self) -> None:
        """Work without the GPU follows (a compile, building, saving): let go until the next
        ``shared``, so nobody waits for it to be alone."""
        if self._holding and not self._alone:
            self._let_go()

    @contextlib.contextmanager
    def exclusive(self, device=None, reason: str = "other") -> Iterator[None]:
        """The GPU to this process alone: every other process has drained its queued work and
        waits; those off the lock and the run's background compiles (``keeping_out``) are
        stopped meanwhile."""
        if self._alone:
            yield
            return
        t0 = time.perf_counter()
        if self._holding:
            self._let_go()  # held shared while waiting for the turnstile, it would block the one alone there
        fcntl.flock(self._turn, fcntl.LOCK_EX)
        fcntl.flock(self._main, fcntl.LOCK_EX)
        self._mark_off(False)
        self._alone = True
        stopped = list(self._kept_out) + self._neighbours_off()
        send_signal(stopped, "SIGSTOP")
        t_held = time.perf_counter()
        self._add_wait(t_held - t0)
        try:
            yield
        finally:
            send_signal(stopped, "SIGCONT")
            fcntl.flock(self._main, fcntl.LOCK_SH)  # shared again, for the steps that follow
            self._holding = True
            fcntl.flock(self._turn, fcntl.LOCK_UN)
            self._alone = False
            self._add_alone(reason, time.perf_counter() - t_held)
