"""Trials sharing a GPU keep pace with each other (scheduling, for ``gpu_share.GpuShare``).

A trial may not pull further ahead of the one with the most training left than it was when it
first met it. Left free, the small models finish first and the largest trains its last epochs
alone, on a GPU it cannot fill at batch 16; kept in step, all of them share the GPU to the end.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

__all__ = ["Pacing", "PACE_SLACK"]

# Steps a trial may run ahead of its pace before it waits: enough to ride over a neighbour's
# short pauses (a window's start, an evaluation batch) without waiting at every step.
PACE_SLACK = 16


class Pacing:
    """The progress of the trials of one process, and the waits that keep them in step."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._pace: dict[int, tuple[int, float | None]] = {}  # thread -> (steps left, solo s per step)
        self._ratio: dict[int, tuple[int, float]] = {}  # thread -> (trial it keeps pace with, steps-left ratio)

    @contextlib.contextmanager
    def track(self, holds: Callable[[], bool]) -> Iterator[Callable[[int, float | None], float]]:
        """This thread's trial keeps pace: call the function it yields after each step with the
        steps it has left and its solo seconds per step (None until measured); it returns the
        seconds it waited. The trial with the most training left (steps left x seconds per
        step) sets the pace. Any other trial holds its ratio of steps left to the pacer's from
        when it first met that pacer (at most 1: one that is behind may catch up, not pass),
        within ``PACE_SLACK`` steps, and waits when it would get further ahead, unless
        ``holds()`` says no (pacing off, or the trial alone on the GPU: the pacer itself would
        be waiting for it). Progress is recorded either way."""
        key = threading.get_ident()
        try:
            yield lambda steps_left, step_s: self._keep(key, steps_left, step_s, holds)
        finally:
            with self._cv:
                self._pace.pop(key, None)
                self._ratio.pop(key, None)
                self._cv.notify_all()

    def _pacer(self) -> int | None:
        known = {k: n * s for k, (n, s) in self._pace.items() if s is not None and n > 0}
        return max(known, key=known.get) if known else None

    def _keep(self, key: int, steps_left: int, step_s: float | None, holds: Callable[[], bool]) -> float:
        t0 = None
        with self._cv:
            before, led = self._pace.get(key), self._pacer() == key
            self._pace[key] = (steps_left, step_s)
            pacer = self._pacer()
            if led or pacer == key or before is None or before[1] != step_s:  # what can free a waiter
                self._cv.notify_all()
            if step_s is None or not holds():
                return 0.0
            while pacer is not None and pacer != key:
                pacer_left = self._pace[pacer][0]
                held = self._ratio.get(key)
                if held is None or held[0] != pacer:  # first met this pacer: hold today's ratio
                    held = self._ratio[key] = (pacer, min(1.0, steps_left / pacer_left))
                if steps_left >= held[1] * pacer_left - PACE_SLACK:
                    break
                t0 = t0 or time.perf_counter()
                self._cv.wait(timeout=1.0)
                pacer = self._pacer()
        return 0.0 if t0 is None else time.perf_counter() - t0
