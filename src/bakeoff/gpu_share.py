"""Several trials of one process sharing a GPU, each on its own CUDA stream.

At batch 16 one graphed training step leaves most of a big GPU idle. Trials in separate
processes only time-slice it; trials in one process, one stream each, overlap their kernels.
The price is measurement: a trial's wall time then depends on its neighbours. So the GPU is
shared through a gate: every piece of GPU work a trial launches happens in a ``shared()``
section, and a trial that must measure alone (batch-1 latency, a solo window of training
steps, graph capture) takes ``exclusive()``, which waits until no other trial is launching
work and drains the device before it starts.

One process-wide gate; when trials run one at a time it is a no-op.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["GpuShare", "NeedsGpuAlone", "share", "set_share", "stream_sync"]


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
            while self._exclusive or self._waiting:
                self._cv.wait()
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
    def exclusive(self, device=None) -> Iterator[None]:
        if getattr(self._local, "depth", 0):
            raise RuntimeError("exclusive() inside shared(): the gate would wait for itself")
        if getattr(self._local, "alone", False):
            yield
            return
        with self._cv:
            self._waiting += 1
            while self._exclusive or self._active:
                self._cv.wait()
            self._waiting -= 1
            self._exclusive = True
        self._local.alone = True
        try:
            if device is not None and getattr(device, "type", "") == "cuda":
                import torch

                torch.cuda.synchronize(device)  # the neighbours' queued kernels finish first
            yield
        finally:
            self._local.alone = False
            with self._cv:
                self._exclusive = False
                self._cv.notify_all()


class _Alone(GpuShare):
    """The gate of a process that runs one trial at a time: nothing to wait for."""

    def __init__(self) -> None:
        super().__init__(1)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def exclusive(self, device=None) -> Iterator[None]:
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
