"""Training time: one definition for every model, engine and runner.

``train_time_s`` is the seconds the protocol's training steps take with the device to the trial
alone, on the kernels the trial ends with. Every epoch times a window of steps alone (the
device synchronised before and after, no neighbour and no background compile running; a Keras
trial, always alone, times every further stretch of the epoch as well); the
first steps of an epoch, where one-off work lands (a new graph, a new batch shape, a kernel
switch), are left out of it. The figure is the median seconds per step of the windows on the
final kernels, times the steps the protocol ran. Building, loading weights, compiling, graph
capture, evaluation and saving are never inside a window; they are reported apart
(``setup_time_s``). A window as long as the epoch makes the figure measured, a shorter one
projected: ``train_time_kind`` says which.

The engines' loops call ``window`` (which steps of an epoch to time), time each window with a
``Solo`` (the one way a stretch is timed alone, latency included), ``Clock.add`` after it and
``Clock.figures`` at the end; who else may use the device meanwhile is the gate's business
(``gpu_share``), passed in by the trial.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["window", "Solo", "Clock", "background_pids", "settle_heap", "WINDOW_SKIP", "WINDOW_STEPS", "MEASURED", "PROJECTED",
           "TOP_ONLY_BASIS"]

# A window: the steps it times, after a few that start the stream (or a new graph) going.
WINDOW_SKIP, WINDOW_STEPS = 8, 48
MEASURED, PROJECTED = "measured alone", "projected from solo windows"
TOP_ONLY_BASIS = "the training images' feature pass and every head epoch, alone"  # --train-only-top-layer


def window(steps: int, start: int = 0, length: int = WINDOW_STEPS, skip: int = WINDOW_SKIP) -> tuple[int, int]:
    """The steps ``[first, end)`` of an epoch of ``steps`` steps that are timed alone, for kernels
    that start at step ``start``: ``length`` steps after ``skip``, or the whole rest of the epoch
    when it is too short to skip any."""
    if steps - start < skip + 4:
        return (start, steps)
    return (start + skip, min(steps, start + skip + length))


class Solo:
    """A stretch timed with the device to this trial alone: inside the gate's exclusive section
    (no neighbour launching work, the run's background compiles stopped), this trial's work
    synchronised (``sync``) at both ends. ``start``/``stop`` for a stretch that spans a loop's
    steps; ``with`` for a block, after which ``seconds`` holds its time."""

    def __init__(self, gate, sync: Callable[[], None], device=None, reason: str = "window") -> None:
        self.gate, self.sync, self.device, self.reason = gate, sync, device, reason
        self.seconds: float | None = None
        self._held: contextlib.ExitStack | None = None
        self._t0 = 0.0

    @property
    def running(self) -> bool:
        return self._held is not None

    def start(self) -> "Solo":
        held = contextlib.ExitStack()
        held.enter_context(self.gate.exclusive(self.device, self.reason))
        self._held = held
        self.sync()
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> float:
        """Seconds since ``start``, read before the neighbours may resume."""
        self.sync()
        self.seconds = time.perf_counter() - self._t0
        self.release()
        return self.seconds

    def release(self) -> None:
        """Leave the exclusive section without a reading (a stretch cut short by a failure)."""
        held, self._held = self._held, None
        if held is not None:
            held.close()

    def __enter__(self) -> "Solo":
        return self.start()

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.stop()
        else:
            self.release()


@dataclass
class Clock:
    """The solo windows of one trial: (kernels, seconds, steps) each, and the steps it ran."""

    windows: list[tuple[str, float, int]] = field(default_factory=list)
    steps: int = 0
    whole_epochs: bool = True  # every window was a whole epoch

    def add(self, kernels: str, seconds: float, steps: int, whole_epoch: bool) -> None:
        if steps > 0:
            self.windows.append((kernels, seconds, steps))
            self.whole_epochs &= whole_epoch

    def figures(self, final_kernels: str) -> dict:
        """``train_time_s`` and how it was taken, from the windows on ``final_kernels``."""
        per_step = [s / n for k, s, n in self.windows if k == final_kernels]
        if not per_step:  # no window on the last kernels (a switch too late for one): the others
            per_step = [s / n for _, s, n in self.windows]
        if not per_step:
            return {"train_time_s": None, "train_time_kind": None, "train_step_ms": None}
        ms = np.asarray(per_step) * 1000.0
        median = float(np.median(ms))
        return {
            "train_time_s": median / 1000.0 * self.steps,
            "train_time_kind": MEASURED if self.whole_epochs else PROJECTED,
            "train_time_basis": (f"median of {len(ms)} solo window(s) of "
                                 f"{'whole epochs' if self.whole_epochs else f'{self.windows[-1][2]} steps'} "
                                 f"on {final_kernels} kernels x {self.steps} steps"),
            "train_step_ms": median,
            "train_step_ms_min": float(ms.min()),
            "train_step_ms_max": float(ms.max()),
        }


def settle_heap() -> None:
    """Collect garbage, then exempt what survived from later collections: called before an
    epoch's windows, so a full collection over a framework's many objects never lands in one
    (it would read as a slow stretch of a host-bound loop)."""
    gc.collect()
    gc.freeze()


def background_pids(background: dict | None, compile: dict | None) -> list[int]:
    """The run's background compile processes a trial stops during its solo windows (and
    latency timing), from its job's ``background`` and ``compile``: only where the trial runs on the host that
    started them (a Ray worker elsewhere has other processes under those ids)."""
    import socket

    found = background or {}
    pids = list(found.get("pids", [])) if found.get("host") == socket.gethostname() else []
    own = (compile or {}).get("pid")
    return sorted(set(pids + ([own] if own is not None else [])))
