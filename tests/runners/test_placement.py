"""How the local runner places trials on several GPUs, with a stand-in worker and device names
as labels (no GPU needed): each trial runs once, on the device it was handed; every device
is used; no device runs more than its share at once or sits idle while trials wait; a trial
that fails or a worker that dies on one GPU costs that trial only."""

from __future__ import annotations

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
