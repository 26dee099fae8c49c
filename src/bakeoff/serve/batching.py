"""Micro-batching: concurrent requests share one forward pass on the device.

An idle server runs a lone request at once (no added latency). Requests that arrive while the
device is busy queue up and go together in the next pass; under load the batcher also waits up
to ``max_wait_ms`` for more, so a burst fills a batch instead of trickling through one by one.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

__all__ = ["MicroBatcher"]


class MicroBatcher:
    """``await submit(x)`` -> the probabilities of ``x`` (one 3 x S x S image), batched with its neighbours."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int = 32,
                 max_wait_ms: float = 2.0) -> None:
        self.predict, self.max_batch, self.max_wait = predict, max(1, int(max_batch)), max(0.0, max_wait_ms) / 1000
        # One thread owns the device: passes never overlap, and the event loop stays free to accept.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="bakeoff-predict")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # every pass's size, for the bench and tests

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, x: np.ndarray) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((x, fut))
        return await fut

    async def _collect(self, under_load: bool) -> list:
        items = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.max_wait if under_load else 0.0)
        while len(items) < self.max_batch:
            if not self._queue.empty():
                items.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return items

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        under_load = False
        while True:
            items = await self._collect(under_load)
            items = [(x, f) for x, f in items if not f.done()]  # a client that went away
            if not items:
                continue
            self.batch_sizes.append(len(items))
            try:
                probs = await loop.run_in_executor(self._executor, self.predict, np.stack([x for x, _ in items]))
            except Exception as exc:  # a failed pass fails its requests, never the server
                for _, f in items:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), p in zip(items, probs):
                if not f.done():
                    f.set_result(p)
            under_load = len(items) > 1 or not self._queue.empty()
