"""How the local runner places trials on several GPUs, with a stand-in worker and device names
as labels (no GPU needed): each trial runs once, on the device it was handed; every device
is used; no device runs more than its share at once or sits idle while trials wait; a trial
that fails or a worker that dies on one GPU costs that trial only."""

from __future__ import annotations

from pathlib import Path

import pytest

from bakeoff.api import _gpu_slots
from bakeoff.runners.local import run_local
from conftest import fake_run, stand_in_worker


def _run(tmp_path, devices, per_device, n, **fake):
    """Run ``n`` stand-in trials on ``devices``; the counts, the stored rows by model and the
    runner's events in order: (event, device, model)."""
    jobs, store, run_id = fake_run(tmp_path, n=n, **fake)
    events = []
    counts = run_local(jobs, store, run_id, lambda what, job, _: events.append((what, job.device, job.spec["id"])),
                       devices=devices, per_device=per_device, target=stand_in_worker)
    return counts, {t["model"]: t for t in store.trials()}, events


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of ``spans`` (start, end) that overlap at one moment."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])  # an end sorts before a start
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def _machine_with(monkeypatch, gpus: int):
    """``torch`` on a machine with ``gpus`` GPUs, as far as finding them goes."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    return torch


# On a GPU a lone trial ends its process (a fresh one each): 6 trials, not 8, on 4 GPUs x 1 keep
# the test short and still leave trials waiting.
@pytest.mark.parametrize("gpus, per_device, n", [(2, 1, 8), (2, 2, 8), (4, 1, 6), (4, 2, 8)])
def test_trials_spread_over_every_gpu_each_once_and_no_more_at_once_than_its_share(tmp_path, monkeypatch, gpus,
                                                                                    per_device, n):
    torch = _machine_with(monkeypatch, gpus)
    devices = [f"cuda:{i}" for i in range(gpus)]
    # the GPUs a run finds are the ones it spreads trials over
    assert _gpu_slots("auto", torch.device("cuda"), str(per_device), None, []) == (devices, per_device)
    counts, rows, events = _run(tmp_path, devices, per_device, n=n, hold=0.3)
    models = [f"m{i}" for i in range(n)]
    assert counts == {"trained": n, "resumed": 0, "failed": 0}
    # Each trial ran exactly once (the stand-in notes every trial it is handed) ...
    ran = [m for m in (tmp_path / "messages.txt").read_text().split() if m != "last"]
    assert sorted(ran) == models
    assert sorted(m for what, _, m in events if what == "start") == models
    # ... on the device the runner handed it, which its row records.
    handed = {m: d for what, d, m in events if what == "start"}
    assert {m: r["result"]["device"] for m, r in rows.items()} == handed
    assert set(handed.values()) == set(devices)
    # No place idles while trials wait: each hand-out (a run of starts) fills as many places as
    # are free, or hands out every trial still waiting; no device gets more than its share. (Who
    # runs how many is left to the trials' lengths: the runner is greedy, it does not deal
    # trials out evenly.)
    in_flight, waiting, i = dict.fromkeys(devices, 0), n, 0
    while i < len(events):
        if events[i][0] != "start":
            in_flight[events[i][1]] -= 1
            i += 1
            continue
        handout = []
        while i < len(events) and events[i][0] == "start":
            handout.append(events[i][1])
            i += 1
        assert len(handout) == min(waiting, sum(per_device - k for k in in_flight.values())), (i, events)
        for device in handout:
            in_flight[device] += 1
        assert max(in_flight.values()) <= per_device, (i, events)
        waiting -= len(handout)
    # At most per_device trials at once on one device, as timed by the trials themselves; with
    # trials that last, each device does run that many at once.
    for device in devices:
        spans = [(r["result"]["start"], r["result"]["end"]) for r in rows.values() if r["result"]["device"] == device]
        assert _most_at_once(spans) == per_device, device


@pytest.mark.parametrize("what, error", [
    ("error", "out of memory: CUDA out of memory on cuda:1"),
    ("crash", "trial process died with exit code 3"),
    ("kill", "trial process died with signal 9 (killed: out of memory?)"),
])
def test_a_trial_that_fails_on_one_gpu_becomes_a_failed_row_and_the_rest_finish_on_both(tmp_path, what, error):
    # m1, the first trial handed to cuda:1, fails there, or its process ends or is killed; m0
    # lasts well beyond the runner's wait for a dead process's last words (2 s) and a loaded
    # machine's process starts, so the trial left, m2, goes to cuda:1 once the failure is known.
    counts, rows, events = _run(tmp_path, ["cuda:0", "cuda:1"], 1, n=3, hold=10.0, on={"m1": {"cuda:1": what}})
    assert counts == {"trained": 2, "resumed": 0, "failed": 1}
    assert rows["m1"]["status"] == "failed" and rows["m1"]["error"] == error
    assert [e for e in events if e[2] == "m1"] == [("start", "cuda:1", "m1"), ("failed", "cuda:1", "m1")]
    m0, m2 = rows["m0"]["result"], rows["m2"]["result"]
    assert rows["m0"]["status"] == rows["m2"]["status"] == "ok"
    assert (m0["device"], m2["device"]) == ("cuda:0", "cuda:1")
    # m2 ran after the failure, in a fresh process: the one started for cuda:1 beside m1's
    assert m2["start"] >= rows["m1"]["finished"] and m2["prewarm"] == "cuda:1" and m2["pid"] != m0["pid"]


def test_a_gpu_named_on_a_machine_of_four_takes_every_trial(tmp_path, monkeypatch):
    torch = _machine_with(monkeypatch, 4)
    devices, per_device = _gpu_slots("cuda:2", torch.device("cuda:2"), "2", None, [])
    assert (devices, per_device) == (["cuda:2"], 2)
    counts, rows, _ = _run(tmp_path, devices, per_device, n=2)
    assert counts["trained"] == 2 and [r["result"]["device"] for r in rows.values()] == ["cuda:2", "cuda:2"]


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_keras_trials_share_a_gpu_with_each_other_and_never_with_pytorch_trials(tmp_path):
    # m0, m1: PyTorch (one worker, two at once); m2-m6: Keras, a process each, two at once;
    # m4 fails beside another Keras trial and runs again with the GPU to itself.
    jobs, store, run_id = fake_run(tmp_path, n=7, hold=3.0, keras=("m2", "m3", "m4", "m5", "m6"),
                                   beside={"m4": "error"})
    counts = run_local(jobs, store, run_id, devices=["cuda:0"], per_device=2, target=stand_in_worker,
                       processes_per_device=2)
    assert counts == {"trained": 7, "resumed": 0, "failed": 0}
    rows = {t["model"]: t["result"] for t in store.trials()}
    torch_rows = [rows["m0"], rows["m1"]]
    keras_rows = [rows[m] for m in ("m2", "m3", "m5", "m6")]
    # Each Keras trial had a process of its own and its GPU's lock files; two ran at once.
    assert len({r["pid"] for r in keras_rows + [rows["m4"]]}) == 5
    assert len({r["gpu_gate"] for r in keras_rows}) == 1 and keras_rows[0]["gpu_gate"].endswith("gpu0")
    assert {r["concurrent_trials"] for r in keras_rows} == {2}
    assert _most_at_once([(r["start"], r["end"]) for r in keras_rows]) == 2
    # No Keras trial ran beside a PyTorch trial: those do not take part in the lock files.
    assert all(r["gpu_gate"] is None for r in torch_rows)
    assert not any(_overlap(k, t) for k in keras_rows + [rows["m4"]] for t in torch_rows)
    # The one that failed beside another ran again alone, with nobody beside it.
    again = rows["m4"]
    assert again["gpu_gate"] is None and again["concurrent_trials"] == 1
    assert again["shared_gpu_error"].startswith("failed beside other trials: out of memory")
    assert not any(_overlap(again, r) for r in keras_rows + torch_rows)
    # The lock files' folder goes with the run.
    assert not Path(keras_rows[0]["gpu_gate"]).parent.exists()


def test_a_lone_keras_trial_is_measured_alone_not_beside_others(tmp_path):
    jobs, store, run_id = fake_run(tmp_path, n=2, keras=("m1",))
    run_local(jobs, store, run_id, devices=["cuda:0"], per_device=2, target=stand_in_worker, processes_per_device=4)
    row = {t["model"]: t["result"] for t in store.trials()}["m1"]
    assert row["gpu_gate"] is None and row["concurrent_trials"] == 1


def test_no_more_keras_trials_at_once_than_the_gpus_memory_holds(tmp_path):
    from bakeoff.runners.local import PROCESS_MODEL_BYTES, _gpu_bytes

    jobs, store, run_id = fake_run(tmp_path, n=4, hold=3.0, keras=("m0", "m1", "m2", "m3"))
    # each holds its 4 images at 8 px and a model: room for two and a half; each lasts longer
    # than a process takes to start on a loaded machine
    assert _gpu_bytes(jobs[0]) == 4 * 8 * 8 * 3 + PROCESS_MODEL_BYTES
    run_local(jobs, store, run_id, devices=["cuda:0"], target=stand_in_worker, processes_per_device=4,
              gpu_memory=int(2.5 * _gpu_bytes(jobs[0])))
    rows = [t["result"] for t in store.trials()]
    assert {r["concurrent_trials"] for r in rows} == {2}
    assert _most_at_once([(r["start"], r["end"]) for r in rows]) == 2


def test_a_keras_trial_killed_while_alone_on_the_gpu_leaves_no_neighbour_stopped(tmp_path):
    # m1 takes the GPU alone, which stops m0 (off the lock, holding its 4 s), and is killed
    # there: m0 must still finish, and the run end
    import threading

    jobs, store, run_id = fake_run(tmp_path, n=2, hold=4.0, keras=("m0", "m1"), on={"m1": {"cuda:0": "kill"}})
    done = {}
    run = threading.Thread(target=lambda: done.update(counts=run_local(
        jobs, store, run_id, devices=["cuda:0"], target=stand_in_worker, processes_per_device=2)), daemon=True)
    run.start()
    run.join(timeout=120)
    assert done.get("counts") == {"trained": 1, "resumed": 0, "failed": 1}
    rows = {t["model"]: t for t in store.trials()}
    assert rows["m0"]["status"] == "ok" and rows["m0"]["result"]["gpu_gate"] is not None
    assert rows["m1"]["error"] == "trial process died with signal 9 (killed: out of memory?)"


def test_a_trial_killed_while_alone_leaves_the_runs_background_compiles_running(tmp_path):
    # m0 stops the run's background compile for a solo section and is killed there: the compile
    # must go on, or a later trial would wait for its kernels until its wait runs out
    import dataclasses
    import socket
    import subprocess
    import sys

    compile_ = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        jobs, store, run_id = fake_run(tmp_path, n=2, on={"m0": {"cuda:0": "kill"}})
        jobs = [dataclasses.replace(j, background={"host": socket.gethostname(), "pids": [compile_.pid]})
                for j in jobs]
        counts = run_local(jobs, store, run_id, devices=["cuda:0"], target=stand_in_worker)
        assert counts == {"trained": 1, "resumed": 0, "failed": 1}
        state = Path(f"/proc/{compile_.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state in "RS"
    finally:
        compile_.kill()
        compile_.wait()
