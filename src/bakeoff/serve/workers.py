"""``bakeoff serve --workers N``: N server processes on one port, each with its own copy of the
model, its own micro-batcher and its own limits.

One process answers requests on one core at a time (the HTTP parsing and the JSON are Python
under one interpreter lock); N processes use N cores, and their forward passes share the device.
Each worker listens on its own socket bound to the same port (``SO_REUSEPORT``): the kernel
spreads new connections over them, so kept-alive clients that connect together do not all land
on whichever process woke first. The supervising process holds the port without listening,
starts the workers, says the server is up once all of them answer, replaces a worker that dies,
and stops them all when it is told to stop.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import threading
from multiprocessing.connection import wait

from bakeoff.errors import BakeoffError
from bakeoff.machine import cpu_threads
from bakeoff.serve.limits import ServeLimits
from bakeoff.serve.predictor import describe, load_predictor
from bakeoff.serve.server import bind, ready_line, run_server, url_of

__all__ = ["serve_workers"]

STOP_WAIT_S = 15.0  # a worker finishing its requests after SIGTERM, before it is killed


def _worker(k: int, host: str, port: int, out_dir, model_id: str, device: str, limits: ServeLimits,
            max_batch: int, batch_wait_ms: float, max_connections: int, workers: int, events, parent: int) -> None:
    from bakeoff.lifetime import die_with_parent

    die_with_parent(parent)
    # Ctrl-C reaches the whole process group: the supervisor stops the workers, so a worker still
    # loading its model does not die of it with a traceback (once serving, uvicorn handles it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        predictor = load_predictor(out_dir, model_id, device)
        sock = bind(host, port, reuse_port=True)
    except BakeoffError as exc:
        events.put(("error", k, str(exc)))
        sys.exit(2)
    except Exception as exc:  # an unexpected failure still reaches the user as one line
        events.put(("error", k, describe(exc)))
        sys.exit(1)
    line = ready_line(predictor, url_of(host, port), workers)
    run_server(sock, predictor, limits, max_batch, batch_wait_ms, max_connections,
               lambda: events.put(("ready", k, line)))


def serve_workers(out_dir, model_id: str, host: str, port: int, device: str, limits: ServeLimits, max_batch: int,
                  batch_wait_ms: float, workers: int, max_connections: int) -> None:
    """Run ``workers`` server processes on ``host:port`` until SIGINT or SIGTERM."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        raise BakeoffError("--workers above 1 needs Linux (its SO_REUSEPORT spreads connections over the workers)")
    holder = bind(host, port, reuse_port=True, listen=False)  # keeps the port ours while workers come and go
    port = holder.getsockname()[1]
    ctx = mp.get_context("spawn")  # no fork: a forked CUDA or JAX runtime does not work
    events = ctx.Queue()
    # The cores split between the workers (children read it as they start), unless already set.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_threads() // workers)))
    procs: dict[int, mp.Process] = {}
    stop = threading.Event()

    def start(k: int) -> None:
        procs[k] = ctx.Process(target=_worker, name=f"bakeoff-serve-{k}", args=(
            k, host, port, out_dir, model_id, device, limits, max_batch, batch_wait_ms, max_connections, workers,
            events, os.getpid()))
        procs[k].start()

    def on_signal(signum, frame):
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for k in range(workers):
            start(k)
        line = _wait_ready(procs, events, stop)
        if line is None:
            return
        print(line, flush=True)
        while not stop.is_set():
            wait([p.sentinel for p in procs.values()], timeout=0.5)
            for k, p in list(procs.items()):
                if not p.is_alive() and not stop.is_set():
                    print(f"warning: server worker {k} ended (exit code {p.exitcode}); starting another",
                          file=sys.stderr, flush=True)
                    start(k)
            _drain(events)
    finally:
        _stop_all(procs)
        holder.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait_ready(procs: dict, events, stop: threading.Event):
    """The ready line once every worker is up; None when stopped first; a worker's error raised."""
    ready, line = set(), None
    while len(ready) < len(procs):
        if stop.is_set():
            return None
        try:
            kind, k, detail = events.get(timeout=0.2)
        except queue.Empty:
            dead = [(k, p.exitcode) for k, p in procs.items() if not p.is_alive() and k not in ready]
            if dead and events.empty():
                raise BakeoffError(f"server worker {dead[0][0]} ended while starting (exit code {dead[0][1]})")
            continue
        if kind == "error":
            raise BakeoffError(detail)
        ready.add(k)
        line = detail
    return line


def _drain(events) -> None:
    try:
        while True:
            events.get_nowait()  # a replacement worker's "ready"
    except queue.Empty:
        pass


def _stop_all(procs: dict) -> None:
    for p in procs.values():
        if p.is_alive():
            p.terminate()  # SIGTERM: the worker finishes the requests it holds
    for p in procs.values():
        p.join(STOP_WAIT_S)
        if p.is_alive():
            p.kill()
            p.join()
