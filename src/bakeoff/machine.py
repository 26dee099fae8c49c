"""What the machine offers a trial: its device's name (for the result row), the memory it may use,
the threads it computes with on the CPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["available_memory_bytes", "device_name", "cpu_threads", "reset_peak_rss", "peak_rss", "release_freed_memory"]


def cpu_threads() -> int:
    """The threads a trial computes with on the CPU, in either engine: OMP_NUM_THREADS where it is
    set (a machine shared with other work: a trial of more threads than its free cores waits on
    the ones descheduled at every parallel step), else every core."""
    asked = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(asked) if asked.isdigit() and int(asked) >= 1 else max(1, os.cpu_count() or 1)


def reset_peak_rss() -> bool:
    """Start this process's peak resident memory afresh (Linux), so that a trial in a process that
    ran others before reports its own peak; False where it cannot, and the peak is the process's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Give memory freed since the last call back to the system (glibc keeps freed heap pages),
    so that the next trial of this process starts from what is still in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def peak_rss(since_reset: bool) -> tuple[float, str]:
    """(MB, kind): this process's peak resident memory since ``reset_peak_rss``, or since it started."""
    import resource

    scale = 1 if platform.system() == "Darwin" else 1024  # macOS counts bytes, Linux KiB
    mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    return mb, "process peak RSS" + ("" if since_reset else " (since the process started)")


def available_memory_bytes(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int:
    """Memory this process may still use: the machine's available memory, or less where the
    process's control group (a container's memory limit, v1 or v2) leaves less."""
    free = None
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    room = _cgroup_room(proc, cgroups)
    return min(free, room) if room is not None else free


def _cgroup_room(proc: Path, cgroups: Path) -> int | None:
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: memory.max / memory.current
            limit_file, used_file = cgroups / path.lstrip("/") / "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # v1
            limit_file, used_file = cgroups / "memory" / path.lstrip("/") / "memory.limit_in_bytes", \
                "memory.usage_in_bytes"
        else:
            continue
        try:
            limit = limit_file.read_text().strip()
            used = int((limit_file.parent / used_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            return max(0, int(limit) - used)
    return None


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()  # what the trial computes with (cpu_threads, set as it starts)
    cores = f"{os.cpu_count()} cores" + (f", {n} thread{'s' if n > 1 else ''}" if n != os.cpu_count() else "")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({cores})"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({cores})"
