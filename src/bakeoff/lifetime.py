"""Nothing outlives its run: a child process ends when the process that started it dies (an
out-of-memory kill included), an output folder is written by one run at a time, and a temporary
file names its writer, so that a later run can tell a dead writer's leftover from a live one's."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from bakeoff.errors import BakeoffError

try:
    import fcntl
except ImportError:  # Windows: folders are not locked
    fcntl = None

__all__ = ["die_with_parent", "watch_parent", "hold_folder", "folder_in_use", "temp_path", "remove_stale_temps",
           "started_at"]

HOST = socket.gethostname()
LOCK_FILE = ".lock"
# temp_path's names: ".<final name>.<host>-<pid>.tmp"
_TEMP = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.tmp$")


def die_with_parent(parent: int) -> None:
    """Call first thing in a child process: it ends as soon as ``parent`` (the process that
    started it) dies, however that dies, instead of training on for nobody and writing into a
    folder the next run owns. On Linux the kernel sends SIGKILL (the parent-death signal; it
    fires when the parent's *thread* that started the child ends, so start children from a
    thread that outlives them); everywhere, a watchdog thread also ends it within a second."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog alone
    watch_parent(parent)


def watch_parent(parent: int, poll_s: float = 0.5) -> None:
    """The portable half of ``die_with_parent``: a daemon thread that ends this process once
    ``parent`` is gone. A multiprocessing child waits on its parent's sentinel (ready the moment
    the parent dies); any other child polls its parent id, which changes when it is adopted."""
    if os.getppid() != parent:  # the parent died before we got here
        os._exit(1)
    known = mp.parent_process()
    sentinel = known.sentinel if known is not None and known.pid == parent else None

    def watch() -> None:
        if sentinel is not None:
            from multiprocessing.connection import wait

            wait([sentinel])
        else:
            while os.getppid() == parent:
                time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


@contextlib.contextmanager
def hold_folder(folder: Path, wait_s: float = 1.0):
    """Hold ``folder`` for one run's whole life (an advisory lock on ``folder/.lock``): a second
    run into it is refused with a one-line error. The kernel drops the lock when the holder's
    process ends, however it ends, so a killed run leaves nothing to clear by hand. Retries for
    ``wait_s``: a reader's ``folder_in_use`` probe holds it for an instant."""
    if fcntl is None:
        yield
        return
    path = Path(folder) / LOCK_FILE
    with open(path, "a+") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                    raise BakeoffError(f"{folder} is in use by another run ({holder}): wait for it to end, "
                                       f"or pass another --out") from None
                time.sleep(0.05)
            except OSError:  # a file system without locks: run unguarded rather than not at all
                yield
                return
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {HOST}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)  # before the lock goes: a later holder's words are never wiped
            fcntl.flock(f, fcntl.LOCK_UN)


def folder_in_use(folder: Path) -> bool | None:
    """Whether a live run holds ``folder`` (``hold_folder``); None where that cannot be told."""
    path = Path(folder) / LOCK_FILE
    if fcntl is None:
        return None
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def temp_path(final: Path) -> Path:
    """Where this process writes ``final`` before renaming it into place: a hidden name beside
    it that says which host and process wrote it (see ``remove_stale_temps``)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{HOST.replace('.', '_')}-{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    if os.name == "nt":  # no safe probe there: keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return _state(pid) != "Z"


def _stat(pid: int, field: int) -> str | None:
    """Field ``field`` of a process's /proc stat after its name (0: state), None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[field]
    except (OSError, IndexError):
        return None


def _state(pid: int) -> str | None:
    """A process's state letter from /proc (Z: ended, not yet reaped), None where unknown."""
    return _stat(pid, 0)


def started_at(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot; Linux), None where unknown: with its
    id, it names one process, never a later one given the same id."""
    return _stat(pid, 19)


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete the ``temp_path`` files in ``root`` and its sub-folders (one level down) whose
    writer, a process of this host, has ended: a run killed while decoding leaves a cache-sized
    one. Files of other hosts (a shared cache folder) and of live processes stay. Returns what
    was removed."""
    removed = []
    host = HOST.replace(".", "_")
    for path in [*Path(root).glob(".*.tmp"), *Path(root).glob("*/.*.tmp")]:
        m = _TEMP.match(path.name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
