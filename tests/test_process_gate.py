"""Trials in processes of their own sharing one GPU through lock files: a process timing alone
never overlaps a neighbour's work, each neighbour drains its queued work before letting go, a
solo section waits only for the neighbours' current step, neighbours at work off the GPU are
stopped meanwhile (never a process that merely reuses a dead one's id), and a dead process
blocks nobody."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bakeoff.process_gate import ProcessGate

SRC = str(Path(__file__).resolve().parents[1] / "src")

NEIGHBOUR = """
import json, sys, time
from bakeoff.process_gate import ProcessGate
path, out, seconds, role = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
drains, spans, asked = [], [], []
gate = ProcessGate(path, drain=lambda: drains.append(time.time()))
end = time.time() + seconds
if role == "steps":  # a training loop: 3 ms steps, each a shared section
    while time.time() < end:
        with gate.shared():
            t0 = time.time()
            time.sleep(0.003)
            spans.append((t0, time.time()))
elif role == "alone":  # solo sections of 100 ms, with shared work between
    time.sleep(0.4)
    while time.time() < end:
        asked.append(time.time())
        with gate.exclusive(reason="window"):
            t0 = time.time()
            time.sleep(0.1)
            spans.append((t0, time.time()))
        with gate.shared():
            time.sleep(0.2)
elif role == "idle":  # one shared section, then work without the GPU (a compile)
    with gate.shared():
        pass
    gate.idle()
    print("idle", flush=True)
    while time.time() < end:
        sum(range(10000))
elif role == "hold":  # alone, then killed there
    with gate.exclusive():
        print("alone", flush=True)
        time.sleep(seconds)
json.dump({"drains": drains, "spans": spans, "asked": asked, "alone_s": gate.alone(), "waited": gate.waited()},
          open(out, "w"))
"""


def _start(tmp_path, role: str, name: str, seconds: float) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / f"{name}.json"
    env = os.environ | {"PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(tmp_path / "gpu0"), str(out), str(seconds), role],
                            env=env, stdout=subprocess.PIPE, text=True)
    return proc, out


def test_a_solo_section_overlaps_no_neighbours_step_and_each_neighbour_drains_first(tmp_path):
    started = [_start(tmp_path, "steps", f"steps{i}", 3.0) for i in range(2)]
    started.append(_start(tmp_path, "alone", "alone", 2.5))
    for proc, _ in started:
        assert proc.wait(timeout=60) == 0
    steppers = [json.loads(out.read_text()) for _, out in started[:2]]
    alone = json.loads(started[2][1].read_text())
    solo = alone["spans"]
    assert len(solo) >= 4
    for stepper in steppers:
        steps = stepper["spans"]
        # no step of a neighbour ran while the process was alone ...
        assert not [(s, w) for s in steps for w in solo if s[0] < w[1] and w[0] < s[1]]
        # ... each neighbour that held the lock when a solo section was asked for (it had
        # stepped since the last one) drained its queued work before the section began ...
        ends = [0.0] + [end for _, end in solo]
        holding = [(asked, begin) for asked, (begin, _), last in zip(alone["asked"], solo, ends)
                   if any(last <= s[0] and s[1] <= asked for s in steps)]
        assert len(holding) >= len(solo) // 2
        for asked, begin in holding:
            assert any(asked <= d <= begin for d in stepper["drains"]), (asked, begin)
        # ... and stepped again between the solo sections
        assert sum(any(end <= s[0] and s[1] <= begin for s in steps)
                   for (_, end), (begin, _) in zip(solo, solo[1:])) >= len(solo) // 2
    # a solo section waited for the neighbours' current step, not for them to stop stepping
    assert max(begin - asked for asked, (begin, _) in zip(alone["asked"], solo)) < 1.0
    assert alone["alone_s"]["window"] == pytest.approx(sum(e - b for b, e in solo), abs=0.05)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _stopped(pid: int) -> bool:
    """Whether ``pid`` stops: a signal reaches a process that waits for a core (state R) when it
    next gets one, before it runs again."""
    deadline = time.time() + 5.0
    while _state(pid) != "T" and time.time() < deadline:
        time.sleep(0.01)
    return _state(pid) == "T"


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_a_neighbour_at_work_off_the_gpu_is_stopped_while_one_is_alone_not_waited_for(tmp_path):
    idle, _ = _start(tmp_path, "idle", "idle", 30.0)
    try:
        assert idle.stdout.readline().strip() == "idle"
        gate = ProcessGate(str(tmp_path / "gpu0"))
        t0 = time.time()
        with gate.exclusive():
            waited = time.time() - t0
            assert _stopped(idle.pid)
            before = _cpu_ticks(idle.pid)
            time.sleep(0.3)
            assert _cpu_ticks(idle.pid) == before  # its cores' work waits too
        assert waited < 1.0
        assert _state(idle.pid) in "RS"
        time.sleep(0.3)
        assert _cpu_ticks(idle.pid) > before  # and goes on after
    finally:
        idle.kill()
        idle.wait()


def test_a_mark_left_by_a_dead_process_stops_nobody_who_reuses_its_id(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gate = ProcessGate(str(tmp_path / "gpu0"))
        # as if a neighbour with this id had marked itself off the lock and died
        (tmp_path / "gpu0.off" / str(bystander.pid)).write_text("12345")
        with gate.exclusive():
            assert _state(bystander.pid) in "RS"
    finally:
        bystander.kill()
        bystander.wait()


def test_a_process_killed_while_alone_leaves_the_gpu_to_the_others(tmp_path):
    holder, _ = _start(tmp_path, "hold", "hold", 60.0)
    assert holder.stdout.readline().strip() == "alone"
    gate = ProcessGate(str(tmp_path / "gpu0"))
    got = threading.Event()

    def take():
        with gate.exclusive():
            got.set()

    threading.Thread(target=take, daemon=True).start()
    assert not got.wait(0.5)  # the holder is alone: we wait
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert got.wait(10.0)  # its lock went with it


def test_background_processes_are_stopped_for_each_solo_section(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gate = ProcessGate(str(tmp_path / "gpu0"))

        with gate.keeping_out([sleeper.pid]):
            with gate.exclusive():
                assert _stopped(sleeper.pid)
            assert _state(sleeper.pid) in "SR"
        with gate.exclusive():  # no longer kept out: left running
            assert _state(sleeper.pid) in "SR"
    finally:
        sleeper.kill()
        sleeper.wait()
