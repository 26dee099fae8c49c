"""The SQLite store: what a trial leaves is read back as written, checked straight in SQLite, and
a later run finds which trials are finished and which are missing."""

from __future__ import annotations

import json
import sqlite3

import pytest

from bakeoff.store import Store


def test_a_saved_trial_reads_back_as_written_and_only_ok_trials_count_as_finished(tmp_path):
    store = Store(tmp_path / "bakeoff.db")
    run = store.start_run("bakeoff run data", "a", {"a": "ka", "b": "kb"}, {"epochs": 2}, {"n": 10}, {})
    store.save_trial("ka", run, "a", "pytorch", "ok", 100.0, result={"accuracy": 0.75, "history": [{"epoch": 1}]})
    store.save_trial("kb", run, "b", "pytorch", "failed", 101.0, error="out of memory: CUDA", traceback="tb")
    with sqlite3.connect(tmp_path / "bakeoff.db") as db:  # as SQLite itself holds them
        rows = {k: (s, e, r) for k, s, e, r in db.execute("SELECT key, status, error, result FROM trials")}
    assert rows == {"ka": ("ok", None, json.dumps({"accuracy": 0.75, "history": [{"epoch": 1}]})),
                    "kb": ("failed", "out of memory: CUDA", None)}
    assert store.finished_keys() == {"ka"}  # a failed trial is trained again by the next run
    by_key = {t["key"]: t for t in store.trials()}
    assert by_key["ka"]["result"] == {"accuracy": 0.75, "history": [{"epoch": 1}]} and by_key["kb"]["result"] is None

    store.update_result("ka", {"endpoint_latency_ms_p50": 3.5})
    assert store.trials(keys=["ka"])[0]["result"]["endpoint_latency_ms_p50"] == 3.5
    with pytest.raises(KeyError):  # no figures to merge into a failed trial
        store.update_result("kb", {"x": 1})


def test_the_latest_run_lists_its_missing_models_and_repeats(tmp_path):
    store = Store(tmp_path / "bakeoff.db")
    first = store.start_run("first", None, {"a": "ka"}, {}, {}, {})
    store.save_trial("ka", first, "a", "pytorch", "ok", 1.0, result={"accuracy": 0.5})
    store.finish_run(first, "finished")
    second = store.start_run("second", None, {"a": "ka", "b": "kb", "c": "kc"}, {}, {}, {},
                             repeat_keys={"a": ["ka", "ka1"], "b": ["kb", "kb1"], "c": ["kc", "kc1"]})
    store.save_trial("kb1", second, "b", "pytorch", "ok", 2.0, result={"accuracy": 0.6})
    run, trials = store.latest_trials()
    assert run["id"] == second and run["command"] == "second"
    assert run["missing"] == ["c"]  # a model with no stored repeat at all
    assert sorted(run["missing_repeats"]) == [("a", 1), ("b", 0)]
    assert {(t["key"], t["repeat"]) for t in trials} == {("ka", 0), ("kb1", 1)}  # the first run's trial counts


def test_a_run_whose_process_is_gone_reads_interrupted(tmp_path):
    store = Store(tmp_path / "bakeoff.db")
    run = store.start_run("killed", None, {"a": "ka"}, {}, {}, {})
    store.save_trial("ka", run, "a", "pytorch", "ok", 5.0, result={})
    assert store.mark_interrupted() == 1
    latest = store.latest_run()
    assert latest["status"] == "interrupted" and latest["finished"] == store.trials()[0]["finished"]
