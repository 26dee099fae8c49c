"""Several trials of one process sharing a GPU, each on its own CUDA stream (scheduling).

At batch 16 one graphed training step leaves most of a big GPU idle; trials in one process, one
stream each, overlap their kernels. A trial's wall time then depends on its neighbours, so the
GPU is shared through a gate: every piece of GPU work a trial launches happens in a
``shared()`` section, and a trial that must measure alone (latency, a solo window of training
steps) takes ``exclusive()``, which waits until no other trial is launching work and drains the
device first. Building a training step (``tuning()``: a capture, or an eager step's first call)
keeps the others away too; with ``tune_together`` tuners may overlap their warm-ups, not their
captures (``warming()``, ``capturing()``).

Each trial holds a ``place()``: a CUDA stream of its own at one of PyTorch's four priorities;
the trials with the most training left get the highest (``prioritize``), and all keep pace
(``pacing``), so the longest does not train alone at the end. The run's background compiles
are stopped for each solo section (``keeping_out``), whether trials share the GPU or not.

A worker makes one gate (a ``LoneGate`` while it runs one trial at a time) and passes it to
each trial; a stretch timed alone goes through ``timing.Solo``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Iterator

from bakeoff.pacing import Pacing

__all__ = ["GpuShare", "LoneGate", "stream_sync", "send_signal", "PRIORITY_LEVELS"]

# Stream priorities PyTorch offers (0, the default, down to -3, the highest).
PRIORITY_LEVELS = 4


class GpuShare:
    """A reader-writer gate over one GPU: many trials launch work at once (shared), one
    measures alone (exclusive). A waiting exclusive section stops new shared ones, so a
    measurement waits for at most one step of each neighbour."""

    def __init__(self, trials: int, tune_together: bool = False, pace: bool = True) -> None:
        self.trials = trials
        self.tune_together = tune_together
        self.pace = pace  # whether pacing() holds trials back (it records their progress either way)
        self._cv = threading.Condition()
        self._active = 0
        self._exclusive = False
        self._waiting = 0
        self._local = threading.local()
        self._streams: dict[str, list[list]] = {}  # device -> per place, one stream per priority level
        self._held: dict[int, float | None] = {}  # place taken -> its trial's training left (solo s), once known
        self._tuners = 0  # threads inside tuning() now
        self._autotuners = 0  # of them, those with cuDNN autotuning on
        self._tuners_waiting = 0
        self._compiling = 0  # threads inside compiling() now
        self._after_compiles = 0  # threads waiting for them to end before they go alone or tune
        self._benchmark_before = False  # cuDNN's flag before the first tuner turned it on
        self._cap_cv = threading.Condition()
        self._warming = 0  # tuners' warm-ups running now
        self._capturing = False
        self._captures_waiting = 0
        self._kept_out: dict[int, int] = {}  # process id -> trials that asked (``keeping_out``)
        self._pacing = Pacing()

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
            if self._held_back():
                t0 = time.perf_counter()
                while self._held_back():
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
            self._wait_for_compiles()
            self._waiting += 1
            while self._exclusive or self._active or self._tuners:
                self._cv.wait()
            self._waiting -= 1
            self._exclusive = True
            stopped = list(self._kept_out)
        self._local.alone = True
        t_held = time.perf_counter()
        try:
            send_signal(stopped, "SIGSTOP")
            if device is not None and getattr(device, "type", "") == "cuda":
                import torch

                torch.cuda.synchronize(device)  # the neighbours' queued kernels finish first
            self._add_wait(time.perf_counter() - t0)
            yield
        finally:
            send_signal(stopped, "SIGCONT")
            self._local.alone = False
            with self._cv:
                self._exclusive = False
                self._cv.notify_all()
            self._add_alone(reason, time.perf_counter() - t_held)

    def idle(self) -> None:
        """Work without the GPU follows: nothing held here (``process_gate`` lets go of its lock)."""

    @contextlib.contextmanager
    def keeping_out(self, pids) -> Iterator[None]:
        """While inside, processes ``pids`` (the run's background compiles, which run the steps
        they compile on the same GPU) are stopped for every solo section (``exclusive``) and
        continued after it, whether trials share the GPU or not. Their GPU work would otherwise
        land inside a trial's solo window, and its training time would read high. The caller
        keeps the ids from being reused meanwhile (their parent reaps them only after the trials
        end). Where the system cannot stop processes (no SIGSTOP), nothing changes."""
        pids = [p for p in ([pids] if isinstance(pids, int) else pids or []) if p is not None]
        if not pids or not hasattr(signal, "SIGSTOP"):
            yield
            return
        with self._cv:
            for pid in pids:
                self._kept_out[pid] = self._kept_out.get(pid, 0) + 1
        try:
            yield
        finally:
            with self._cv:
                for pid in pids:
                    left = self._kept_out.pop(pid) - 1
                    if left:
                        self._kept_out[pid] = left

    def _held_back(self) -> bool:
        """A new shared section must wait: someone is (or is waiting to be) alone or tuning."""
        return bool(self._exclusive or self._waiting or self._tuners or self._tuners_waiting)

    @contextlib.contextmanager
    def tuning(self, device=None, reason: str = "capture", autotune: bool = True) -> Iterator[None]:
        """This thread builds a training step (a capture, or an eager step's first call) with
        no trial training or measuring meanwhile: a neighbour's dropout would fail during a
        capture, and a first call's seconds of host work would count in a neighbour's timings.
        With ``autotune``, cuDNN autotuning is on inside (each convolution shape met gets
        candidate kernels built and timed, and keeps the fastest); the flag is process-wide, so
        it reaches only tuners' work, and the candidates are timed on a GPU that the
        neighbours' steps do not load. Other trials may tune at the same time if
        ``tune_together``. Time inside counts towards ``alone()`` under ``reason``."""
        import torch

        if getattr(self._local, "depth", 0):
            raise RuntimeError("tuning() inside shared(): the gate would wait for itself")
        nested = getattr(self._local, "alone", False)
        t0 = time.perf_counter()
        with self._cv:
            if not nested:
                self._wait_for_compiles()
            self._tuners_waiting += 1
            while not nested and (self._exclusive or self._active or (self._tuners and not self.tune_together)):
                self._cv.wait()
            self._tuners_waiting -= 1
            self._tuners += 1
            if autotune:
                self._autotuners += 1
                if self._autotuners == 1:
                    self._benchmark_before = torch.backends.cudnn.benchmark
                    torch.backends.cudnn.benchmark = True
            if self._tuners == 1 and not nested and getattr(device, "type", "") == "cuda":
                torch.cuda.synchronize(device)  # neighbours' queued steps end before tuning starts
        self._local.alone = True
        t_held = time.perf_counter()
        self._add_wait(t_held - t0)
        try:
            yield
        finally:
            self._local.alone = nested
            with self._cv:
                self._tuners -= 1
                if autotune:
                    self._autotuners -= 1
                    if self._autotuners == 0:
                        torch.backends.cudnn.benchmark = self._benchmark_before
                if self._tuners == 0:
                    self._cv.notify_all()
            self._add_alone(reason, time.perf_counter() - t_held)

    def _wait_for_compiles(self) -> None:
        """(Holding ``_cv``.) Until no neighbour compiles: a solo section or a capture waits
        for them, while the other trials go on training; no new compile starts meanwhile."""
        if not self._compiling:
            return
        self._after_compiles += 1
        while self._compiling:
            self._cv.wait()
        self._after_compiles -= 1

    @contextlib.contextmanager
    def compiling(self) -> Iterator[None]:
        """This thread compiles its training step: seconds of host work, and the first calls of
        the compiled step on the GPU (a step's worth of work, on its own stream). It runs beside
        the neighbours' training, so the GPU keeps busy; never beside a solo section (whose
        timing the extra work would skew) or a capture (``warming``). Solo sections and
        captures that want to start wait until the compiles running end; no new compile starts
        while they wait or run."""
        if getattr(self._local, "depth", 0) or getattr(self._local, "alone", False):
            raise RuntimeError("compiling() inside shared(), exclusive() or tuning(): it must run beside them")
        with self._cv:
            while self._held_back() or self._after_compiles:
                self._cv.wait()
            self._compiling += 1
        try:
            with self.warming():
                yield
        finally:
            with self._cv:
                self._compiling -= 1
                if self._compiling == 0:
                    self._cv.notify_all()

    @contextlib.contextmanager
    def warming(self) -> Iterator[None]:
        """A tuner's GPU work other than the capture itself (static inputs, warm-up steps): it
        may overlap other tuners' warm-ups, never a capture. PyTorch's CUDA random generator
        is process-wide and in capture mode for a whole capture: a neighbour's dropout or
        ``randn`` meanwhile fails ("Offset increment outside graph capture")."""
        with self._cap_cv:
            while self._capturing or self._captures_waiting:
                self._cap_cv.wait()
            self._warming += 1
        try:
            yield
        finally:
            with self._cap_cv:
                self._warming -= 1
                self._cap_cv.notify_all()

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """A graph capture, with no other tuner's warm-up or capture launching work meanwhile."""
        with self._cap_cv:
            self._captures_waiting += 1
            while self._capturing or self._warming:
                self._cap_cv.wait()
            self._captures_waiting -= 1
            self._capturing = True
        try:
            yield
        finally:
            with self._cap_cv:
                self._capturing = False
                self._cap_cv.notify_all()

    def _add_alone(self, reason: str, seconds: float) -> None:
        if self.concurrent:
            spent = getattr(self._local, "alone_s", None) or {}
            spent[reason] = spent.get(reason, 0.0) + seconds
            self._local.alone_s = spent

    def _add_wait(self, seconds: float) -> None:
        self._local.waited = getattr(self._local, "waited", 0.0) + seconds

    def alone(self) -> dict[str, float]:
        """Seconds this thread has held the GPU alone while trials shared it, by reason (capture,
        window, latency, ...): time its neighbours waited (a capture's, with other tuners, shared)."""
        return dict(getattr(self._local, "alone_s", None) or {})

    def waited(self) -> float:
        """Seconds this thread has waited at the gate: for its neighbours' steps (and queued
        kernels) to end before it ran alone, or for a neighbour's solo section to end."""
        return getattr(self._local, "waited", 0.0)

    def shared_figures(self, since: tuple[float, dict[str, float]]) -> dict:
        """A trial's ``gpu_wait_s`` and ``gpu_alone_s`` since ``since`` (``waited()``, ``alone()`` at its start)."""
        if not self.concurrent:  # it had the device to itself
            return {"gpu_wait_s": None, "gpu_alone_s": None}
        return {"gpu_wait_s": self.waited() - since[0],
                "gpu_alone_s": {k: v - since[1].get(k, 0.0) for k, v in self.alone().items()}}

    @contextlib.contextmanager
    def place(self, device) -> Iterator[None]:
        """A trial's place on ``device`` for its whole run: a CUDA stream of its own, current in
        this thread. The places' streams are made together, once: PyTorch hands out 32 streams
        per priority in turn, so streams made later (a trial after the first ones, beside
        graph captures that take streams too) could be a neighbour's, and two trials on one
        stream would run one after the other."""
        import torch

        with self._cv:
            places = self.streams(device)
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

    def streams(self, device) -> list[list]:
        """Each place's streams on ``device``, one per priority level (0 first), made on first use."""
        import torch

        places = self._streams.get(str(device))
        if places is None:
            places = self._streams[str(device)] = [
                [torch.cuda.Stream(device, priority=-level) for level in range(PRIORITY_LEVELS)]
                for _ in range(self.trials)]
        return places

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

    def pacing(self):
        """A context yielding the function a trial's loop calls after each step with its steps
        left and solo seconds per step (``pacing.Pacing``); it returns the seconds it waited.
        Trials one at a time never wait; nor does a trial inside its own solo section."""
        if not self.concurrent:
            return contextlib.nullcontext(lambda steps_left, step_s: 0.0)
        return self._pacing.track(lambda: self.pace and not getattr(self._local, "alone", False))


class LoneGate(GpuShare):
    """The gate of a trial alone on its device: nothing to wait for, but background compiles
    to stop for each solo section."""

    def __init__(self) -> None:
        super().__init__(1)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def exclusive(self, device=None, reason: str = "other") -> Iterator[None]:
        stopped = list(self._kept_out)  # nobody to wait for, but background compiles to stop
        send_signal(stopped, "SIGSTOP")
        try:
            yield
        finally:
            send_signal(stopped, "SIGCONT")


def send_signal(pids: list[int], name: str) -> None:
    """Send signal ``name`` to each of ``pids`` that still exists, to its whole group where it
    leads one (a compile's worker pool, which would otherwise compile on during a window)."""
    for pid in pids:
        try:
            (os.killpg if os.getpgid(pid) == pid else os.kill)(pid, getattr(signal, name))
        except (ProcessLookupError, PermissionError):  # ended (and reaped), or not ours
            pass


def stream_sync(device) -> None:
    """Wait for this thread's own work on ``device`` (its current stream), not the neighbours'."""
    if getattr(device, "type", "") == "cuda":
        import torch

        torch.cuda.current_stream(device).synchronize()
