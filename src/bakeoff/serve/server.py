"""Run the HTTP server (in this process), or start one in a subprocess on a free loopback port."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from PIL import Image

from bakeoff.errors import BakeoffError
from bakeoff.serve.limits import QuietRepeats, ServeLimits, connection_limit, guarded_protocol, raise_fd_limit
from bakeoff.serve.predictor import load_predictor, require_serve

__all__ = ["serve", "run_server", "bind", "url_of", "ready_line", "check_settings", "ServerProcess", "READY_PREFIX"]

READY_PREFIX = "serving "  # the line `bakeoff serve` prints once /ping answers 200, with the URL last
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def bind(host: str, port: int, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A TCP socket on ``host:port`` (port 0 picks a free one), listening unless ``listen`` is off.
    ``reuse_port``: several sockets share the port and the kernel spreads connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # Nagle's algorithm and delayed ACKs add ~40 ms to every small response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BakeoffError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
                           f"(0 picks a free one)")
    if listen:
        sock.listen(2048)
    return sock


def url_of(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def ready_line(predictor, url: str, workers: int = 1) -> str:
    """What `bakeoff serve` prints once it answers (``ServerProcess`` reads the URL after " at ")."""
    how = f"{predictor.framework}, {len(predictor.classes)} classes, {predictor.device}"
    return f"{READY_PREFIX}{predictor.model_id} ({how}{f', {workers} workers' if workers > 1 else ''}) at {url}"


def check_settings(limits: ServeLimits, max_batch: int, workers: int = 1) -> int:
    """Refuse bad settings before any model loads; returns the connection cap of one process."""
    limits.check()
    if max_batch < 1:
        raise BakeoffError(f"--max-batch must be at least 1, got {max_batch}")
    if workers < 1:
        raise BakeoffError(f"--workers must be at least 1, got {workers}")
    return connection_limit(limits.max_connections, raise_fd_limit())


def run_server(sock: socket.socket, predictor, limits: ServeLimits, max_batch: int, batch_wait_ms: float,
               max_connections: int, on_started) -> None:
    """Answer requests for ``predictor`` on the listening ``sock`` until told to stop (SIGINT,
    SIGTERM); ``on_started()`` runs once the server accepts."""
    import uvicorn

    from bakeoff.serve.app import create_app

    # Every image's pixels are checked against --max-pixels from its header before it is decoded;
    # Pillow's own bomb check would turn large ones into warnings on stderr or vaguer errors.
    Image.MAX_IMAGE_PIXELS = None
    app = create_app(predictor, limits, max_batch, batch_wait_ms)
    # limit_concurrency stays off: the guarded protocol caps connections when they open instead.
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5,
                            http=guarded_protocol(max_connections, limits.header_timeout_s),
                            h11_max_incomplete_event_size=16 * 1024)
    server = uvicorn.Server(config)
    quiet = QuietRepeats()
    for name in ("uvicorn.error", "asyncio"):
        logging.getLogger(name).addFilter(quiet)

    def announce():
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        if server.started:
            on_started()

    threading.Thread(target=announce, daemon=True).start()
    server.run(sockets=[sock])


def serve(out_dir, model_id: str, host: str = "127.0.0.1", port: int = 8080, device: str = "auto",
          limits: ServeLimits = ServeLimits(), max_batch: int = 32, batch_wait_ms: float = 2.0,
          workers: int = 1) -> None:
    """Load the saved model and answer requests until interrupted (port 0 picks a free port).
    ``workers`` above 1: that many processes, each with the model and the limits, share the port."""
    require_serve("fastapi", "uvicorn")
    max_connections = check_settings(limits, max_batch, workers)
    if host not in LOOPBACK:
        print(f"warning: listening on {host}, reachable from other machines; bakeoff serve has no authentication",
              file=sys.stderr)
    if workers > 1:
        from bakeoff.serve.workers import serve_workers

        serve_workers(out_dir, model_id, host, port, device, limits, max_batch, batch_wait_ms, workers,
                      max_connections)
        return
    predictor = load_predictor(out_dir, model_id, device)
    sock = bind(host, port)
    line = ready_line(predictor, url_of(host, sock.getsockname()[1]))
    run_server(sock, predictor, limits, max_batch, batch_wait_ms, max_connections, lambda: print(line, flush=True))


# Set for a server a run starts (``ServerProcess``): the id of the process it must not outlive.
PARENT_ENV = "BAKEOFF_SERVE_PARENT"


class ServerProcess:
    """``bakeoff serve`` in a subprocess on a free loopback port; ``url`` once ready.

    >>> with ServerProcess("runs/leaves", "timm/efficientnet_b0") as srv:  # doctest: +SKIP
    ...     httpx.post(srv.url + "/invocations", content=jpeg, headers={"Content-Type": "application/x-image"})
    """

    def __init__(self, out_dir, model_id: str, device: str = "cpu", extra_args: tuple[str, ...] = (),
                 start_timeout_s: float = 300.0) -> None:
        self.args = [sys.executable, "-m", "bakeoff.cli", "serve", str(out_dir), "--model", model_id,
                     "--host", "127.0.0.1", "--port", "0", "--device", device, *extra_args]
        self.start_timeout_s = start_timeout_s
        self.url: str | None = None
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{PARENT_ENV: str(os.getpid())})
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
        found: list[str] = []
        ready = threading.Event()

        def read_stdout():  # keeps draining, so the pipe never fills
            for line in self.proc.stdout:
                if line.startswith(READY_PREFIX) and not found:
                    found.append(line.rsplit(" at ", 1)[1].strip())
                    ready.set()
            ready.set()

        threading.Thread(target=read_stdout, daemon=True).start()
        if not ready.wait(self.start_timeout_s) or not found:
            error = self._error_text() or f"no answer within {self.start_timeout_s:.0f} s"
            self.__exit__(None, None, None)
            raise BakeoffError(f"the model server did not start: {error}")
        self.url = found[0]
        return self

    def stderr_text(self) -> str:
        """What the server wrote to stderr so far (its log)."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _error_text(self) -> str:
        try:
            self.proc.wait(timeout=5)  # stdout closed: the process is ending
        except subprocess.TimeoutExpired:
            return ""
        lines = [ln.strip() for ln in self.stderr_text().splitlines() if ln.strip()]
        return lines[-1].removeprefix("error: ")[:500] if lines else f"exit code {self.proc.returncode}"

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
