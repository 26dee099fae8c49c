"""The gate through which trials of one process share a GPU."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
import torch

from bakeoff.gpu_share import GpuShare, LoneGate
from conftest import becomes_stopped, held_in_thread, process_state, spinning_child


def test_exclusive_waits_for_shared_sections_and_holds_new_ones_back():
    gate, log = GpuShare(2), []
    t = held_in_thread(gate.shared, lambda: log.append("neighbour step done"))
    with gate.exclusive():
        log.append("alone")
        late = threading.Thread(target=lambda: (gate.shared().__enter__(), log.append("late step")))
        late.start()
        time.sleep(0.1)
        log.append("still alone")
    late.join()
    t.join()
    assert log == ["neighbour step done", "alone", "still alone", "late step"]


def test_the_gate_counts_each_threads_waiting():
    gate, inside, waits = GpuShare(2), threading.Event(), {}

    def neighbour():
        with gate.shared():
            inside.set()
            time.sleep(0.3)
        waits["neighbour"] = gate.waited()

    t = threading.Thread(target=neighbour)
    t.start()
    inside.wait()
    with gate.exclusive():  # waits for the neighbour's step
        pass
    t.join()
    assert 0.2 < gate.waited() < 2.0 and waits["neighbour"] == 0.0
    with gate.shared():
        pass
    assert gate.waited() < 2.0


def test_trials_with_more_training_left_get_higher_stream_priority(monkeypatch):
    gate, moved, results = GpuShare(4), [], {}
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: moved.append(s))
    gate._held = dict.fromkeys(range(4))  # four trials hold places

    def trial(p, left):
        gate._local.place = (p, [f"place{p} level{lv}" for lv in range(4)])
        results[p] = gate.prioritize(left)

    for p, left in enumerate([5.0, 40.0, 20.0, 300.0]):  # ranked one after another
        t = threading.Thread(target=trial, args=(p, left))
        t.start()
        t.join()
    # Each is ranked among the trials known by then, over the three others holding places.
    assert results == {0: 0, 1: -1, 2: -1, 3: -3}
    assert moved == ["place0 level0", "place1 level1", "place2 level1", "place3 level3"]
    assert gate.prioritize(10.0) == 0 and LoneGate().prioritize(10.0) == 0  # no place held; a lone trial


def test_nested_sections_do_not_deadlock_and_misuse_is_an_error():
    gate = GpuShare(2)
    with gate.exclusive():
        with gate.shared():  # a measurement's own launches
            pass
        with gate.exclusive():
            pass
    with gate.shared():
        with gate.shared():
            pass
        with pytest.raises(RuntimeError, match="inside shared"):
            with gate.exclusive():
                pass


def test_a_process_running_one_trial_has_a_gate_that_never_waits():
    gate = LoneGate()
    assert not gate.concurrent
    with gate.shared(), gate.exclusive():
        pass


def test_by_default_tuners_take_turns_and_captures_never_overlap_a_warm_up():
    gate, log = GpuShare(2), []

    def tuner(name):
        with gate.tuning():
            log.append(name + " in")
            time.sleep(0.1)
            log.append(name + " out")

    threads = [threading.Thread(target=tuner, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])

    log.clear()
    t = held_in_thread(gate.warming, lambda: log.append("warm-up done"))
    late = threading.Thread(target=lambda: (time.sleep(0.05), gate.warming().__enter__(), log.append("late warm-up")))
    late.start()
    with gate.capturing():  # waits for the running warm-up; the late one waits for the capture
        log.append("capture")
        time.sleep(0.1)
    late.join()
    t.join()
    assert log == ["warm-up done", "capture", "late warm-up"]


def test_a_trial_keeps_pace_with_the_one_that_has_the_most_training_left():
    from bakeoff.pacing import PACE_SLACK

    gate, left, checks, waited = GpuShare(2), {"pacer": 200}, [], {}
    ready = threading.Event()

    def pacer():
        with gate.pacing() as keep:
            keep(200, 1.0)  # 200 steps of a second: 200 s of training left, the most
            ready.set()
            for n in range(199, 99, -1):
                time.sleep(0.002)
                left["pacer"] = n
                keep(n, 1.0)
        left["pacer"] = 0  # it left (trained its share), still 100 steps to go: no one waits for it

    def follower():
        ready.wait()
        total = 0.0
        with gate.pacing() as keep:
            for n in range(200, -1, -1):  # as many steps, a hundred times faster each
                total += keep(n, 0.01)
                checks.append((n, left["pacer"]))
        waited["follower"] = total

    threads = [threading.Thread(target=pacer), threading.Thread(target=follower)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads)
    # Never more than the slack ahead of the pacer while it trained; free once it had left.
    assert all(n >= p - PACE_SLACK for n, p in checks if p) and waited["follower"] > 0.05
    assert checks[-1] == (0, 0)


def test_a_trial_alone_on_the_gpu_or_behind_never_waits_and_a_late_one_holds_its_ratio():
    gate, released = GpuShare(3), threading.Event()
    with gate.pacing() as keep_pacer:
        keep_pacer(100, 1.0)
        results = {}

        def trial(name, steps):
            with gate.pacing() as keep:
                for i, n in enumerate(steps):
                    if name == "alone":
                        with gate.exclusive():
                            results[name, i] = keep(n, 0.01)
                    else:
                        results[name, i] = keep(n, 0.01)
                        if name == "late" and i == 1:
                            released.set()

        behind = threading.Thread(target=trial, args=("behind", [150, 140]))  # more steps left: free
        alone = threading.Thread(target=trial, args=("alone", [10, 0]))  # far ahead, but in a solo window
        for t in (behind, alone):
            t.start()
            t.join(timeout=5)
        assert results["behind", 1] == 0.0 and results["alone", 1] == 0.0
        # Met the pacer at half its steps left: it may stay that far ahead, not get further.
        late = threading.Thread(target=trial, args=("late", [50, 40, 20]))
        late.start()
        assert released.wait(5)  # 40 >= 0.5 x 100 - 16: went on
        time.sleep(0.3)
        assert late.is_alive()  # 20 < 0.5 x 100 - 16: waits
        keep_pacer(60, 1.0)  # 20 >= 0.5 x 60 - 16: goes on
        late.join(timeout=5)
        assert not late.is_alive() and results["late", 2] > 0.2


def test_a_shared_trials_evaluation_never_stops_its_neighbours_nor_tunes(monkeypatch):
    from types import SimpleNamespace

    from bakeoff.data.batches import Batcher
    from bakeoff.engines.torch.fit import predict_probs
    from bakeoff.protocol import Protocol

    calls, flags = [], []

    class Recording(GpuShare):
        def shared(self):
            calls.append("shared")
            return super().shared()

        def exclusive(self, device=None, reason="other"):
            calls.append(reason)
            return super().exclusive()

    images = np.random.default_rng(0).integers(0, 255, (300, 36, 36, 3), dtype=np.uint8)
    b = Batcher.create(images, np.arange(300), 32, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model.register_forward_hook(lambda mod, inp, out: flags.append(torch.backends.cudnn.benchmark))
    monkeypatch.setattr("bakeoff.engines.torch.fit.sync_fn", lambda device: lambda: None)  # stand-in "cuda"
    probs = predict_probs(model, b, np.arange(300), Protocol(pretrained=False, precision="fp32"),
                          SimpleNamespace(type="cuda"), gate=Recording(2))
    assert probs.shape == (300, 4)
    assert set(calls) == {"shared"} and flags == [False, False, False]  # three batches of 128, heuristics


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_places_have_their_own_streams_at_each_priority_and_the_pace_bounds_queued_steps():
    from bakeoff.engines.torch.step import Pace

    dev, gate, seen = torch.device("cuda"), GpuShare(3), {}
    ranked, done = threading.Event(), threading.Event()

    def trial(i, left, hold):
        with gate.place(dev):
            seen[i, "start"] = torch.cuda.current_stream(dev)
            seen[i, "priority"] = gate.prioritize(left)
            seen[i, "now"] = torch.cuda.current_stream(dev)
            if hold:  # keeps its place while the next trial ranks itself
                ranked.set()
                done.wait()

    first = threading.Thread(target=trial, args=(0, 1.0, True))
    first.start()
    ranked.wait()
    second = threading.Thread(target=trial, args=(1, 2.0, False))  # more left than the first
    second.start()
    second.join()
    done.set()
    first.join()
    assert seen[0, "start"].priority == 0 and seen[0, "priority"] == 0
    assert seen[1, "priority"] < 0 and seen[1, "now"].priority == seen[1, "priority"]
    assert seen[1, "start"] != seen[0, "start"]  # places at once: streams of their own
    later = threading.Thread(target=trial, args=(2, 1.0, False))
    later.start()
    later.join()
    assert seen[2, "start"] == seen[0, "start"]  # the first free place again
    streams = {s.cuda_stream for place in gate._streams[str(dev)] for s in place}
    assert len(streams) == 3 * 4  # no two places or levels on one stream
    pace, t0 = Pace(depth=2), time.perf_counter()
    cycles = int(0.05 * torch.cuda.get_device_properties(dev).clock_rate * 1000)  # about 50 ms
    for _ in range(8):
        torch.cuda._sleep(cycles)
        pace()
    queued = time.perf_counter() - t0
    torch.cuda.synchronize()
    # The host waited for all but the last two steps: about 6 x 50 ms before it could go on.
    assert queued > 0.6 * (time.perf_counter() - t0) and queued > 0.2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
def test_a_background_compile_is_stopped_for_each_solo_section_and_continued_after():
    child = spinning_child()
    gate = GpuShare(2)
    try:
        with gate.exclusive():  # not kept out: it runs on
            time.sleep(0.05)
            assert process_state(child.pid) != "T"
        with gate.keeping_out(child.pid), gate.keeping_out(child.pid):  # two trials, one process
            with gate.exclusive(reason="window"):
                assert becomes_stopped(child.pid, stopped=True)
            assert becomes_stopped(child.pid, stopped=False)
            with gate.shared():  # the neighbours' training: it runs beside it
                time.sleep(0.05)
                assert process_state(child.pid) != "T"
        with gate.exclusive():  # no trial keeps it out any more
            time.sleep(0.05)
            assert process_state(child.pid) != "T"
    finally:
        child.kill()
        child.wait()
    with gate.keeping_out(child.pid), gate.exclusive():  # ended and reaped: nothing to stop, no error
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
def test_a_background_compile_s_worker_processes_are_stopped_with_it():
    import subprocess

    # A compile started as the run starts it (its own session), with a worker of its own, as
    # the compiler's pool has: the window stops both, and both go on after it.
    code = ("import subprocess, sys, time\n"
            "w = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.005)'])\n"
            "print(w.pid, flush=True)\nwhile True: time.sleep(0.005)")
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    worker = int(leader.stdout.readline())
    gate = GpuShare(2)
    try:
        with gate.keeping_out(leader.pid), gate.exclusive(reason="window"):
            assert becomes_stopped(leader.pid, stopped=True) and becomes_stopped(worker, stopped=True)
        assert becomes_stopped(leader.pid, stopped=False) and becomes_stopped(worker, stopped=False)
    finally:
        import os
        import signal

        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()


def _inside(section, log, name, until: threading.Event) -> tuple[threading.Thread, threading.Event]:
    """A started thread that logs ``name`` once inside ``section()`` and leaves it at ``until``."""
    inside = threading.Event()

    def hold():
        with section():
            log.append(name)
            inside.set()
            until.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    return t, inside


def test_a_compile_runs_beside_training_and_never_beside_a_solo_section():
    gate, log = GpuShare(3), []
    end_compile, end_solo = threading.Event(), threading.Event()
    compiler, compiling = _inside(gate.compiling, log, "compiling", end_compile)
    assert compiling.wait(5)
    with gate.shared():  # a neighbour's step goes on meanwhile
        log.append("step")
    solo, alone = _inside(gate.exclusive, log, "alone", end_solo)
    assert not alone.wait(0.2)  # the solo section waits for the compile...
    with gate.shared():  # ...without holding the other trials back
        log.append("step")
    end_compile.set()
    assert alone.wait(5)
    assert log == ["compiling", "step", "step", "alone"]
    # Someone is alone now: a new compile waits until that section ends.
    second, compiling = _inside(gate.compiling, log, "compiling again", threading.Event())
    assert not compiling.wait(0.2)
    end_solo.set()
    assert compiling.wait(5) and log[-1] == "compiling again"
    for t in (compiler, solo, second):
        t.join(6)
    with pytest.raises(RuntimeError, match="beside"):
        with gate.shared(), gate.compiling():
            pass
