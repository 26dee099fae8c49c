"""What the machine offers a run: the memory left, inside a container's limit too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_available_memory_respects_the_control_group_limit(tmp_path, version):
    from bakeoff.machine import available_memory_bytes

    proc, cg = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 33554432 kB\nMemAvailable: 16777216 kB\n")  # 16 GiB free
    if version == "v1":
        (proc / "self" / "cgroup").write_text("5:cpu:/\n4:memory:/box/one\n0::/\n")
        folder, limit, used = cg / "memory" / "box" / "one", "memory.limit_in_bytes", "memory.usage_in_bytes"
    else:
        (proc / "self" / "cgroup").write_text("0::/box/one\n")
        folder, limit, used = cg / "box" / "one", "memory.max", "memory.current"
    folder.mkdir(parents=True)
    (folder / limit).write_text(str(3 * 2**30))
    (folder / used).write_text(str(2**30))
    assert available_memory_bytes(proc, cg) == 2 * 2**30  # the container's 2 GiB left, not the host's 16
    (folder / limit).write_text("max\n" if version == "v2" else "9223372036854771712\n")
    assert available_memory_bytes(proc, cg) == 16 * 2**30
    (proc / "self" / "cgroup").unlink()
    assert available_memory_bytes(proc, cg) == 16 * 2**30


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_a_trials_peak_memory_counts_from_its_start_not_the_processes():
    from bakeoff.machine import peak_rss, reset_peak_rss

    big = np.ones(400 * 2**20 // 8)  # 400 MB touched, then freed: an earlier trial's peak
    del big
    before, kind_before = peak_rss(since_reset=False)
    assert reset_peak_rss()
    after, kind = peak_rss(since_reset=True)
    assert before - after > 300
    assert kind == "process peak RSS" and kind_before == "process peak RSS (since the process started)"
    status = Path("/proc/self/status").read_text()
    hwm_mb = int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1]) / 1024
    assert abs(hwm_mb - after) < 50  # the kernel's own high-water mark agrees
