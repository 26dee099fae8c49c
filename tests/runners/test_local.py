"""Trials in local worker processes: several trials share one worker (and a GPU) and train as
they would alone, a trial that fails beside others runs again alone, workers are started early
and stopped when nothing is left."""

from __future__ import annotations

import json
import sqlite3

import pandas as pd
import pytest

from bakeoff.api import run_comparison
from bakeoff.engines.torch.trial import load_saved
from bakeoff.zoo.spec import safe_name
from conftest import TINY, fake_run, stand_in_worker


def test_trials_sharing_one_worker_train_as_they_would_alone(shared_colour_folder, tmp_path, monkeypatch):
    import torch

    import bakeoff.api

    models = ["timm/test_resnet", "timm/test_efficientnet"]
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    run_comparison(shared_colour_folder, models, out=alone, **TINY)
    # two trials at once in one worker process (on a GPU: one CUDA stream each)
    monkeypatch.setattr(bakeoff.api, "_gpu_slots", lambda *a: (["cpu"], 2))
    run_comparison(shared_colour_folder, models, out=shared, **TINY)
    a = pd.read_csv(alone / "results.csv").set_index("model")
    s = pd.read_csv(shared / "results.csv").set_index("model")
    assert (s["status"] == "ok").all() and (s["concurrent_trials"] == 2).all()
    # Epochs of a few steps: each one's window is the whole epoch, alone, whether trials share or not.
    assert (s["train_time_kind"] == "measured alone").all() and (s["train_wall_s"] > 0).all()
    assert (a["train_time_kind"] == "measured alone").all()
    assert s["data_reused"].sum() == 1  # the second trial used the images the first one loaded
    with sqlite3.connect(shared / "bakeoff.db") as db:
        held = [json.loads(r)["gpu_alone_s"] for r, in db.execute("SELECT result FROM trials")]
    # What each held the device alone for: its solo windows (and latency), never tuning on a CPU.
    assert all(set(h) == {"window", "latency"} and h["window"] > 0 for h in held), held
    # Each trial keeps its own seed while the other builds and trains beside it.
    for m in models:
        assert s.loc[m, "accuracy"] == a.loc[m, "accuracy"], m
        folder = safe_name(m)
        w_alone = load_saved(alone / "models" / folder)[0].state_dict()
        w_shared = load_saved(shared / "models" / folder)[0].state_dict()
        assert all(torch.allclose(w_alone[k].float(), w_shared[k].float(), atol=1e-5) for k in w_alone), m


def test_a_trial_that_cannot_share_the_gpu_runs_again_alone(tmp_path):
    from bakeoff.runners.local import run_local

    jobs, store, run_id = fake_run(tmp_path, {"m0": "alone", "m1": "alone", "m2": "alone"})
    counts = run_local(jobs, store, run_id, devices=["cpu"], per_device=3, target=stand_in_worker)
    assert counts == {"trained": 3, "resumed": 0, "failed": 0}
    rows = {t["model"]: t for t in store.trials()}
    assert set(rows) == {"m0", "m1", "m2"}
    for row in rows.values():
        result = row["result"]
        assert result["concurrent_trials_seen"] == 1  # the second time, in a process of its own
        assert "capture failed" in result["shared_gpu_error"]


def test_a_sharing_worker_hears_when_no_more_trials_will_come(tmp_path):
    from bakeoff.runners.local import run_local

    jobs, store, run_id = fake_run(tmp_path, n=5)
    counts = run_local(jobs, store, run_id, devices=["cpu"], per_device=3, target=stand_in_worker)
    assert counts["trained"] == 5
    # Told once, after the fifth trial was handed over (the trials it runs then keep pace).
    messages = (tmp_path / "messages.txt").read_text().split()
    assert sorted(messages[:5]) == ["m0", "m1", "m2", "m3", "m4"] and messages[5:] == ["last"]


def test_a_worker_started_early_runs_the_first_trials_or_is_stopped(tmp_path):
    import multiprocessing as mp

    from bakeoff.runners.local import _Worker, run_local

    jobs, store, run_id = fake_run(tmp_path)
    warm = _Worker(mp.get_context("spawn"), prewarm="cpu", target=stand_in_worker)
    counts = run_local(jobs, store, run_id, devices=["cpu"], per_device=1, warm=warm,
                       target=stand_in_worker)
    assert counts["trained"] == 3
    assert {t["result"]["pid"] for t in store.trials()} == {warm.proc.pid}  # all three in the early worker
    assert not warm.proc.is_alive()
    # Nothing left to train: the early worker is stopped, not left behind.
    idle = _Worker(mp.get_context("spawn"), prewarm="cpu", target=stand_in_worker)
    assert run_local(jobs, store, run_id, devices=["cpu"], warm=idle)["resumed"] == 3
    assert not idle.proc.is_alive()


def test_the_next_gpu_trials_process_starts_while_one_trains(tmp_path):
    import multiprocessing as mp

    from bakeoff.runners.local import run_local

    jobs, store, run_id = fake_run(tmp_path)  # full fine-tunes: on a GPU, each ends its process
    counts = run_local(jobs, store, run_id, devices=["cuda:0"], per_device=1, target=stand_in_worker)
    assert counts["trained"] == 3
    rows = sorted(store.trials(), key=lambda t: t["started"])
    results = [r["result"] for r in rows]
    assert len({r["pid"] for r in results}) == 3  # a fresh process for each trial
    # the second and third were started (and warmed on their GPU) while the one before trained
    assert [r["prewarm"] for r in results] == [None, "cuda:0", "cuda:0"]
    assert not mp.active_children()  # no spare process is left behind


def test_a_gpu_gets_no_more_places_than_trials_to_fill_them(tmp_path):
    from bakeoff.runners.local import run_local

    for devices, expected in ((["cpu"], 3), (["cpu", "cpu"], 2)):
        jobs, store, run_id = fake_run(tmp_path / str(len(devices)))
        run_local(jobs, store, run_id, devices=devices, per_device=8, target=stand_in_worker)
        assert {t["result"]["concurrent_trials"] for t in store.trials()} == {expected}, devices


@pytest.mark.parametrize("crash", [False, True])
def test_a_trial_that_fails_beside_others_runs_again_alone(tmp_path, crash):
    from bakeoff.runners.local import run_local

    jobs, store, run_id = fake_run(tmp_path, {"m1": "crash" if crash else "error"})
    counts = run_local(jobs, store, run_id, devices=["cpu"], per_device=3, target=stand_in_worker)
    assert counts == {"trained": 3, "resumed": 0, "failed": 0}
    rows = {t["model"]: t["result"] for t in store.trials()}
    assert rows["m0"]["concurrent_trials_seen"] == 3 and rows["m0"]["shared_gpu_error"] is None
    assert rows["m1"]["concurrent_trials_seen"] == 1
    why = "trial process died with exit code 3" if crash else "out of memory"
    assert rows["m1"]["shared_gpu_error"].startswith("failed beside other trials: ") and why in rows["m1"]["shared_gpu_error"]
    # a crash takes down the trials running beside it too: m2 (queued behind m1) reruns alone
    assert (rows["m2"]["shared_gpu_error"] is not None) == crash
