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

The engines' loops call ``window`` (which steps of an epoch to time), ``Clock.add`` after each
timed window and ``Clock.figures`` at the end; what "alone" means on the device is the caller's
gate (``gpu_share``).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import numpy as np

__all__ = ["window", "Clock", "background_pids", "settle_heap", "WINDOW_SKIP", "WINDOW_STEPS", "MEASURED", "PROJECTED",
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
