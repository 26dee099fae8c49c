"""Which kernels a trial's training step runs on: eager until its background compile
(``compile.Compiles``) is ready, then compiled, switched where no window is being timed."""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["Kernels"]


class Kernels:
    """The step's kernels and the switch to compiled ones (``Step.adopt``): from which epoch,
    at what cost in seconds, and why not.

    ``ready`` (None: no background compile): whether the compiled kernels can be loaded now.
    ``settled``: the background compile ended, ready or failed."""

    def __init__(self, model, compile_fn: Callable, ready: Callable[[], bool] | None,
                 settled: Callable[[], bool] | None, sync: Callable[[], None]) -> None:
        self.model, self.compile_fn, self.ready, self.settled, self.sync = model, compile_fn, ready, settled, sync
        self.step = None
        self.compiled_from: int | None = None  # the first epoch (1-based) on compiled kernels
        self.error: str | None = None
        self.seconds = 0.0  # compiling and switching
        self.waited = 0.0  # waiting for the background compile before the last epoch
        self._early = ready is not None and ready()  # compiled by an earlier run: from the first epoch

    def first(self):
        """What the step is built with: the compiled model when its kernels are ready now, else None."""
        return self.compile_fn(self.model) if self._early else None

    def built(self, step) -> None:
        """The step is built (compiled first, if ``first`` gave it a compiled model)."""
        self.step = step
        self.seconds += step.compile_s
        if self._early:
            self.error = step.compile_error
            self.compiled_from = 1 if self.error is None else None

    @property
    def name(self) -> str:
        return "compiled" if self.compiled_from is not None else "eager"

    def pending(self) -> bool:
        """Waiting for compiled kernels: neither switched nor failed yet."""
        return self.ready is not None and self.compiled_from is None and self.error is None

    def switch_if_ready(self, from_epoch: int) -> tuple[bool, float]:
        """Switch to the compiled kernels now if they are pending and ready: (switched, seconds
        it took, the GPU work included)."""
        if not (self.pending() and self.ready()):
            return False, 0.0
        t0 = time.perf_counter()
        self.error = self.step.adopt(self.compile_fn(self.model))
        self.sync()
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        if self.error is None:
            self.compiled_from = from_epoch
        return self.error is None, seconds

    def before_last_epoch(self, epoch: int, limit_s: float) -> None:
        """Wait (up to ``limit_s``) for kernels still pending, so the trial ends on the same
        kernels whether the compile cache was cold or warm; switch if they came."""
        if not self.pending() or self.settled is None:
            return
        t0 = time.perf_counter()
        while not self.settled() and time.perf_counter() - t0 < limit_s:
            time.sleep(0.25)
        waited = time.perf_counter() - t0
        self.waited += waited
        switched, _ = self.switch_if_ready(epoch + 1)
        if not switched and self.error is None and not self.settled():
            self.error = f"its compiled kernels were not ready after waiting {waited:.0f} s"

    def finish(self) -> None:
        if self.pending():
            self.error = "its compiled kernels were not ready before the last epoch began"
