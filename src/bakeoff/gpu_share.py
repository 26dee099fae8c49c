"""Several trials of one process sharing a GPU, each on its own CUDA stream.

At batch 16 one graphed training step leaves most of a big GPU idle. Trials in separate
processes only time-slice it; trials in one process, one stream each, overlap their kernels.
The price is measurement: a trial's wall time then depends on its neighbours. So the GPU is
shared through a gate: every piece of GPU work a trial launches happens in a ``shared()``
section, and a trial that must measure alone (batch-1 latency, a solo window of training
steps, graph capture) takes ``exclusive()``, which waits until no other trial is launching
work and drains the device before it starts.

Each trial holds a ``place()``: a CUDA stream of its own for its whole run, at one of
PyTorch's four stream priorities. Trials that have the most training left get the highest
(``prioritize``), so the GPU's scheduler serves their kernels first and the longest trial does
not end up training alone at the end while the GPU idles around it.

One process-wide gate; when trials run one at a time it is a no-op.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

__all__ = ["GpuShare", "NeedsGpuAlone", "share", "set_share", "stream_sync", "PRIORITY_LEVELS"]

# Stream priorities PyTorch offers (0, the default, down to -3, the highest).
PRIORITY_LEVELS = 4


class NeedsGpuAlone(RuntimeError):
    """A trial that cannot run beside others (its training step could not be captured while
    it shared the GPU): the runner runs it again in a process of its own."""


class GpuShare:
    """A reader-writer gate over one GPU: many trials launch work at once (shared), one
    measures alone (exclusive). A waiting exclusive section stops new shared ones, so a
    measurement waits for at most one step of each neighbour."""

    def __init__(self, trials: int) -> None:
        self.trials = trials
        self._cv = threading.Condition()
        self._active = 0
        self._exclusive = False
        self._waiting = 0
        self._local = threading.local()
        self._streams: dict[str, list[list]] = {}  # device -> per place, one stream per priority level
        self._held: dict[int, float | None] = {}  # place taken -> its trial's training left (solo s), once known

    @property
    def concurrent(self) -> bool:
        return self.trials > 1

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth or getattr(self._local, "alone", False):  # nested, or inside our own exclusive section
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        with self._cv:
            if self._exclusive or self._waiting:
                t0 = time.perf_counter()
                while self._exclusive or self._waiting:
                    self._cv.wait()
                self._add_wait(time.perf_counter() - t0)
            self._active += 1
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cv:
                self._active -= 1
                if self._active == 0:
                    self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self, device=None, reason: str = "other") -> Iterator[None]:
        """The GPU to this thread alone; ``reason`` names what for (``alone()`` adds it up)."""
        if getattr(self._local, "depth", 0):
            raise RuntimeError("exclusive() inside shared(): the gate would wait for itself")
        if getattr(self._local, "alone", False):
            yield
            return
        t0 = time.perf_counter()
        with self._cv:
            self._waiting += 1
            while self._exclusive or self._active:
                self._cv.wait()
            self._waiting -= 1
            self._exclusive = True
        self._local.alone = True
        t_held = time.perf_counter()
        try:
            if device is not None and getattr(device, "type", "") == "cuda":
                import torch

                torch.cuda.synchronize(device)  # the neighbours' queued kernels finish first
            self._add_wait(time.perf_counter() - t0)
            yield
        finally:
            self._local.alone = False
            with self._cv:
                self._exclusive = False
                self._cv.notify_all()
            if self.concurrent:
                spent = getattr(self._local, "alone_s", None) or {}
                spent[reason] = spent.get(reason, 0.0) + time.perf_counter() - t_held
                self._local.alone_s = spent

    def _add_wait(self, seconds: float) -> None:
        self._local.waited = getattr(self._local, "waited", 0.0) + seconds

    def alone(self) -> dict[str, float]:
        """Seconds this thread has held the GPU alone while trials shared it, by reason
        (capture, window, latency, ...): time every neighbour spent waiting for it."""
        return dict(getattr(self._local, "alone_s", None) or {})

    def waited(self) -> float:
        """Seconds this thread has spent waiting at the gate: for its neighbours' steps to end
        before it could run alone (and for their queued kernels to drain), or for a neighbour's
        solo section to end before it could launch again."""
        return getattr(self._local, "waited", 0.0)

    @contextlib.contextmanager
    def place(self, device) -> Iterator[None]:
        """A trial's place on ``device`` for its whole run: a CUDA stream of its own, current in
        this thread. The places' streams are made together, once: PyTorch hands out 32 streams
        per priority in turn, so streams made later (a trial after the first ones, beside
        graph captures that take streams too) could be a neighbour's, and two trials on one
        stream would run one after the other."""
        import torch

        with self._cv:
            places = self._streams.get(str(device))
            if places is None:
                places = self._streams[str(device)] = [
                    [torch.cuda.Stream(device, priority=-level) for level in range(PRIORITY_LEVELS)]
                    for _ in range(self.trials)]
            slot = min(set(range(len(places))) - self._held.keys())
            self._held[slot] = None
        self._local.place = (slot, places[slot])
        try:
            with torch.cuda.device(device), torch.cuda.stream(places[slot][0]):
                yield
        finally:
            self._local.place = None
            with self._cv:
                del self._held[slot]

    def prioritize(self, left_s: float) -> int:
        """Rank this thread's trial by the training it has ``left_s`` (solo seconds) among the
        trials holding places, and move it to the stream of that rank's priority; returns the
        priority (0 lowest, -3 highest). Call it only while the trial's stream is idle (just
        synchronised): later work on the new stream does not wait for the old one's."""
        import torch

        held = getattr(self._local, "place", None)
        if held is None:
            return 0
        slot, streams = held
        with self._cv:
            self._held[slot] = left_s
            below = sum(v is not None and v < left_s for k, v in self._held.items() if k != slot)
            level = round((PRIORITY_LEVELS - 1) * below / max(1, len(self._held) - 1))
        torch.cuda.set_stream(streams[level])
        return -level


class _Alone(GpuShare):
    """The gate of a process that runs one trial at a time: nothing to wait for."""

    def __init__(self) -> None:
        super().__init__(1)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def exclusive(self, device=None, reason: str = "other") -> Iterator[None]:
        yield


_SHARE: GpuShare = _Alone()


def share() -> GpuShare:
    """This process's gate."""
    return _SHARE


def set_share(gate: GpuShare | None) -> None:
    global _SHARE
    _SHARE = gate if gate is not None else _Alone()


def stream_sync(device) -> None:
    """Wait for this thread's own work on ``device`` (its current stream), not the neighbours'."""
    if getattr(device, "type", "") == "cuda":
        import torch

        torch.cuda.current_stream(device).synchronize()
