"""What hostile or slow clients may cost the server: memory budgets shared by all requests, a
connection cap with a deadline for each request's head, the file-descriptor limit, and a log
that repeated warnings cannot flood."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass

from bakeoff.errors import BakeoffError

__all__ = ["ServeLimits", "Budget", "raise_fd_limit", "connection_limit", "guarded_protocol", "QuietRepeats"]

# Descriptors kept free of connections: the model's files, the thread pools, the log.
FD_RESERVE = 128
BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


@dataclass(frozen=True)
class ServeLimits:
    """The per-request and per-server limits of ``bakeoff serve`` (the CLI options of the same names)."""

    max_body_bytes: int = 10 * 2**20
    max_pixels: int = 10_000_000
    max_images: int = 32
    max_connections: int | None = None  # None: 1000, or less where the descriptor limit is low
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0

    def check(self) -> None:
        for name, value in (("--max-body-mb", self.max_body_bytes / 2**20), ("--max-pixels", self.max_pixels),
                            ("--max-images", self.max_images), ("--max-connections", self.max_connections),
                            ("--header-timeout", self.header_timeout_s), ("--body-timeout", self.body_timeout_s)):
            if value is not None and not value > 0:
                raise BakeoffError(f"{name} must be positive, got {value:g}")


class Budget:
    """An asyncio semaphore whose units are bytes or pixels: ``async with budget.take(n)`` waits
    until ``n`` units are free. What all requests hold at once stays under ``capacity``, so peak
    memory is bounded by it whatever the number of clients; a lone request larger than the
    capacity is refused by its caller before it asks. First come, first served: a large taker
    is not starved by a stream of small ones."""

    def __init__(self, capacity: int) -> None:
        self.capacity = self.free = int(capacity)
        self._queue: deque = deque()  # (units, future) of the takers waiting, in arrival order

    @asynccontextmanager
    async def take(self, n: int):
        n = min(int(n), self.capacity)
        if self._queue or self.free < n:
            entry = (n, asyncio.get_running_loop().create_future())
            self._queue.append(entry)
            try:
                await entry[1]
            except asyncio.CancelledError:
                if entry[1].done() and not entry[1].cancelled():  # granted as it was cancelled
                    self._release(n)
                else:
                    self._queue.remove(entry)
                    self._grant()  # it may have been the head holding the others back
                raise
        else:
            self.free -= n
        try:
            yield
        finally:
            self._release(n)

    def _release(self, n: int) -> None:
        self.free += n
        self._grant()

    def _grant(self) -> None:
        while self._queue and self._queue[0][0] <= self.free:
            n, future = self._queue.popleft()
            self.free -= n
            future.set_result(None)


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; returns the soft limit.

    Every connection is a descriptor; at the usual soft limit (1024) a connection flood makes
    ``accept`` fail over and over, and each failure is a logged traceback.
    """
    try:
        import resource
    except ImportError:  # not on this platform: nothing to raise
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # some systems refuse the hard value; keep the soft one
            pass
    return soft


def connection_limit(asked: int | None, fd_limit: int) -> int:
    """The connection cap: ``asked`` (default 1000), at most half the descriptors left after a reserve."""
    most = max(1, (fd_limit - FD_RESERVE) // 2)
    if asked is None:
        return min(1000, most)
    if asked > most:
        raise BakeoffError(f"--max-connections {asked} is over what this process can keep open: at most {most} "
                           f"(half its open-file limit of {fd_limit}, less a reserve)")
    return asked


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a connection cap and a deadline for each request's head.

    uvicorn times out only idle kept-alive connections, not one that sent part of its headers,
    and its ``limit_concurrency`` answers 503 to every request once the open connections reach
    it, so idle sockets would shut out ``/ping``. Here a connection must deliver its request
    line and headers within ``header_timeout_s`` of opening (or of its next request's first
    byte), and at the cap a new connection closes the one that has waited longest for its head;
    only when every connection is inside a request is the newcomer refused (503).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    waiting: dict = {}  # connections whose request head is not in yet, oldest first

    class GuardedH11Protocol(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                if not waiting:
                    transport.write(BUSY)
                    transport.close()
                    return
                oldest = next(iter(waiting))
                oldest.head_done()
                oldest.transport.close()
            self.await_head()

        def await_head(self) -> None:
            waiting[self] = None
            self.head_timer = self.loop.call_later(header_timeout_s, self.head_late)

        def head_done(self) -> None:
            waiting.pop(self, None)
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def head_late(self) -> None:
            self.head_done()
            if self.conn.their_state is h11.IDLE:
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in (or the request was refused)
                self.head_done()
            elif self.head_timer is None and not self.transport.is_closing():  # a kept-alive connection's next request
                self.await_head()

        def connection_lost(self, exc) -> None:
            self.head_done()
            super().connection_lost(exc)

    return GuardedH11Protocol


class QuietRepeats(logging.Filter):
    """Lets each kind of message (its format string) through once per ``period_s``: a stream of
    bad clients then costs a few log lines, not a full disk."""

    def __init__(self, period_s: float = 60.0) -> None:
        super().__init__()
        self.period_s, self.last = period_s, {}

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = (record.name, str(record.msg)), time.monotonic()
        last = self.last.get(key)
        if last is not None and now - last < self.period_s:
            return False
        self.last[key] = now
        return True
