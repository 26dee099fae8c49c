"""The gate through which trials of one process share a GPU."""

from __future__ import annotations

import contextlib
import sys
import threading
import time

import numpy as np
import pytest
import torch

from bakeoff.gpu_share import GpuShare, LoneGate


def _held_in_thread(section, done) -> threading.Thread:
    """A started thread inside ``section()`` for 0.2 s, then ``done()``; returns once it is inside."""
    inside = threading.Event()

    def hold():
        with section():
            inside.set()
            time.sleep(0.2)
            done()

    t = threading.Thread(target=hold)
    t.start()
    inside.wait()
    return t


def test_exclusive_waits_for_shared_sections_and_holds_new_ones_back():
    gate, log = GpuShare(2), []
    t = _held_in_thread(gate.shared, lambda: log.append("neighbour step done"))
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


def test_tuning_is_on_only_while_no_trial_trains_and_tuners_may_overlap(monkeypatch):
    from bakeoff.engines.torch.step import tuned

    gate, log, both = GpuShare(3, tune_together=True), [], threading.Barrier(2, timeout=5)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    def tuner(name, fail):
        with contextlib.suppress(ValueError), tuned(gate, torch.device("cpu"), "capture", autotune=True):
            both.wait()  # two trials tuning at once: neither waits for the other
            log.append((name, torch.backends.cudnn.benchmark))
            if fail:
                raise ValueError("a failed capture")
            time.sleep(0.2)
            log.append((name + " done", torch.backends.cudnn.benchmark))  # on until the last tuner leaves

    t = _held_in_thread(gate.shared, lambda: log.append(("neighbour step done", torch.backends.cudnn.benchmark)))
    tuners = [threading.Thread(target=tuner, args=(n, n == "b")) for n in "ab"]
    for th in tuners:
        th.start()
    time.sleep(0.05)
    with gate.shared():  # a step asked for while they tune waits for both to end
        log.append(("next step", torch.backends.cudnn.benchmark))
    for th in tuners + [t]:
        th.join()
    with tuned(gate, torch.device("cpu"), "tune"):  # by default: alone, on cuDNN's heuristics
        log.append(("default", torch.backends.cudnn.benchmark))
    alone = gate.alone()
    assert log[0] == ("neighbour step done", False)  # tuning waited for the neighbour's step
    assert sorted(log[1:3]) == [("a", True), ("b", True)]
    assert log[3:] == [("a done", True), ("next step", False), ("default", False)]
    assert torch.backends.cudnn.benchmark is False  # back off, after a failure too
    assert set(alone) == {"tune"} and alone["tune"] >= 0.0  # this thread's own; each tuner counts its own


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
    t = _held_in_thread(gate.warming, lambda: log.append("warm-up done"))
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
def test_one_graph_of_many_head_steps_equals_the_same_steps_run_eagerly():
    from bakeoff.engines.torch.step import make_optimizer, Step
    from bakeoff.protocol import Protocol

    dev = torch.device("cuda")
    feats, labels = torch.randn(640, 32, device=dev), torch.randint(0, 5, (640,), device=dev)
    idx = torch.randperm(640, device=dev)
    out = []
    for graphs in (True, False):
        torch.manual_seed(0)
        head = torch.nn.Linear(32, 5).to(dev)
        proto = Protocol(pretrained=False, cuda_graphs=graphs, precision="fp32")
        step = Step(head, make_optimizer(proto, head.parameters(), capturable=graphs), proto, dev, (16, 32), False,
                     source=(feats, labels), steps=8)
        assert step.mode == ("cuda-graph" if graphs else "eager")
        for start in range(0, 640, 128):
            step.gathered(idx[start:start + 128])
        out.append((head.weight.detach().clone(), float(step.loss_sum)))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
    assert np.isclose(out[0][1], out[1][1], rtol=1e-4)


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("autotune", [True, False])
@pytest.mark.parametrize("graphs", [True, False])
def test_only_the_training_steps_shapes_are_tuned_and_only_when_asked(graphs, autotune, monkeypatch):
    from bakeoff.data.batches import Batcher
    from bakeoff.engines.torch.fit import fit

    from bakeoff.protocol import Protocol

    dev, seen = torch.device("cuda"), []
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)).to(dev)
    model.register_forward_hook(lambda mod, inp, out: seen.append((len(inp[0]), mod.training,
                                                                   torch.backends.cudnn.benchmark)))
    images = np.random.default_rng(0).integers(0, 255, (90, 36, 36, 3), dtype=np.uint8)
    labels = np.arange(90) % 3
    b = Batcher.create(images, np.arange(90), 32, (0.5,) * 3, (0.25,) * 3, dev)
    proto = Protocol(pretrained=False, epochs=1, precision="fp32", cuda_graphs=graphs)
    torch.backends.cudnn.benchmark = False
    monkeypatch.setattr("bakeoff.engines.torch.step.AUTOTUNE", autotune)
    out = fit(model, b, np.arange(70), labels, np.arange(70, 90), proto, dev)
    assert out.step_mode == ("cuda-graph" if graphs else "eager")
    tuned = {(n, train) for n, train, on in seen if on}
    # With autotuning, the training step's shape only, at its warm-up or capture; without, none.
    assert tuned == ({(16, True)} if autotune else set())
    assert (6, True, False) in seen and (128, False, False) in seen  # last batch and evaluation: heuristics
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tune_together", [False, True])
def test_trials_capture_their_steps_at_once_and_each_graph_trains(tune_together):
    from bakeoff.engines.torch.step import make_optimizer, Step
    from bakeoff.protocol import Protocol

    dev, gate, steps, start = torch.device("cuda"), GpuShare(3, tune_together), {}, threading.Barrier(3, timeout=30)
    proto = Protocol(pretrained=False)
    torch.backends.cudnn.benchmark = False

    def trial(i):
        torch.manual_seed(i)
        # Dropout draws from the process-wide CUDA generator: a capture beside a neighbour's
        # warm-up fails on it.
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8 * (i + 1), 3), torch.nn.BatchNorm2d(8 * (i + 1)),
                                    torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Dropout(0.2), torch.nn.Linear(8 * (i + 1), 3)
                                    ).to(dev).to(memory_format=torch.channels_last)
        with gate.place(dev):
            start.wait()
            step = Step(model, make_optimizer(proto, model.parameters(), capturable=True), proto, dev,
                         (16, 3, 40, 40), True, gate=gate)
            x = torch.randn(16, 3, 40, 40, device=dev).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 3, (16,), device=dev)
            for _ in range(30):
                with gate.shared():
                    step(x, y)
            torch.cuda.current_stream(dev).synchronize()
            steps[i] = (step, float(step.loss_sum), gate.alone())

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(steps) == [0, 1, 2]
    for step, loss_sum, alone in steps.values():
        assert step.mode == "cuda-graph" and step.capture_error is None
        assert np.isfinite(loss_sum) and loss_sum > 0 and "capture" in alone
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_last_smaller_batch_is_met_before_training_and_leaves_no_trace():
    from bakeoff.engines.torch.step import make_optimizer, Step
    from bakeoff.protocol import Protocol

    dev, seen, proto = torch.device("cuda"), [], Protocol(pretrained=False, precision="fp32")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)).to(dev)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.register_forward_hook(lambda mod, inp, out: seen.append(len(inp[0])))
    opt = make_optimizer(proto, model.parameters(), capturable=True)
    step = Step(model, opt, proto, dev, (16, 3, 36, 36), False, last_batch=6)
    assert step.mode == "cuda-graph" and 6 in seen  # met at construction, not in the first epoch
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics put back
    assert all(float(t.sum()) == 0 for state in opt.state.values() for t in state.values() if torch.is_tensor(t))
    assert float(step.loss_sum) == 0 and int(step.correct) == 0


def _spinning_child(code: str = ""):
    """A Python process that prints "ready" and then wakes every 5 ms until it is ended."""
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n" + code +
                              "print('ready', flush=True)\nwhile True: time.sleep(0.005)"],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def _state(pid: int) -> str:
    from pathlib import Path

    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]  # R, S, T (stopped), ...


def _becomes(pid: int, stopped: bool) -> bool:
    deadline = time.time() + 3
    while time.time() < deadline:
        if (_state(pid) == "T") == stopped:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
def test_a_background_compile_is_stopped_for_each_solo_section_and_continued_after():
    child = _spinning_child()
    gate = GpuShare(2)
    try:
        with gate.exclusive():  # not kept out: it runs on
            time.sleep(0.05)
            assert _state(child.pid) != "T"
        with gate.keeping_out(child.pid), gate.keeping_out(child.pid):  # two trials, one process
            with gate.exclusive(reason="window"):
                assert _becomes(child.pid, stopped=True)
            assert _becomes(child.pid, stopped=False)
            with gate.shared():  # the neighbours' training: it runs beside it
                time.sleep(0.05)
                assert _state(child.pid) != "T"
        with gate.exclusive():  # no trial keeps it out any more
            time.sleep(0.05)
            assert _state(child.pid) != "T"
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
            assert _becomes(leader.pid, stopped=True) and _becomes(worker, stopped=True)
        assert _becomes(leader.pid, stopped=False) and _becomes(worker, stopped=False)
    finally:
        import os
        import signal

        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sends SIGSTOP")
def test_ending_the_compiles_continues_a_stopped_one_so_it_can_exit():
    import os
    import signal

    from bakeoff.engines.torch.compile import Compiles

    # It handles SIGTERM itself, as a compiler's worker pool may: stopped, it would never see it.
    child = _spinning_child("signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\n")
    os.kill(child.pid, signal.SIGSTOP)
    assert _becomes(child.pid, stopped=True)
    compiles = Compiles()
    compiles.procs.append(child)
    t0 = time.perf_counter()
    compiles.stop()
    assert child.returncode == 3 and time.perf_counter() - t0 < 5
