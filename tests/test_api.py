"""End to end: a real (tiny) comparison through the API and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import pytest

from bakeoff.api import report, run_comparison
from bakeoff.engines.torch.trial import load_saved
from bakeoff.errors import BakeoffError
from bakeoff.protocol import Protocol
from bakeoff.store import Store
from conftest import TINY, stand_in_worker

BAKEOFF = [sys.executable, "-m", "bakeoff.cli"]
REQUIRED = ["model", "framework", "status", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "p_vs_baseline", "n_val",
            "top5", "macro_f1", "train_time_s", "train_time_kind", "setup_time_s", "latency_ms_p50", "latency_ms_p95",
            "latency_kind", "throughput_img_s", "params", "size_mb"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shared_colour_folder):
    out = tmp_path_factory.mktemp("run") / "out"
    comparison = run_comparison(shared_colour_folder, ["timm/test_resnet", "timm/test_efficientnet",
                                                       "torchvision/inception_v3", "timm/test_convnext"],
                                out=out, **(TINY | {"epochs": 3}))
    return out, comparison


def test_learns_a_learnable_task_and_writes_every_output(finished_run):
    out, comparison = finished_run
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns[:len(REQUIRED)]) == REQUIRED
    ok = results.set_index("model")
    assert ok.loc["timm/test_resnet", "status"] == "ok"
    assert ok.loc["timm/test_resnet", "accuracy"] >= 0.9  # chance is 1/3
    assert ok.loc["timm/test_resnet", "accuracy_ci_low"] <= ok.loc["timm/test_resnet", "accuracy"]
    assert ok.loc["timm/test_resnet", "params"] > 0 and ok.loc["timm/test_resnet", "latency_ms_p50"] > 0
    for name in ("relative.csv", "bakeoff.db", "plots/accuracy_vs_training_time.png",
                 "plots/accuracy_vs_inference_time.png", "class_label_to_prediction_index.json", "dataset.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "class_label_to_prediction_index.json").read_text()) == {"blue": 0, "green": 1, "red": 2}
    assert comparison.run["counts"] == {"trained": 3, "resumed": 0, "failed": 1}


def test_baseline_row_is_one_and_default_baseline_is_first(finished_run):
    out, comparison = finished_run
    rel = pd.read_csv(out / "relative.csv").set_index("model")
    assert comparison.baseline == "timm/test_resnet"
    assert rel.loc["timm/test_resnet", ["relative_accuracy", "relative_training_time",
                                        "relative_inference_time"]].tolist() == [1.0, 1.0, 1.0]


def test_a_failing_trial_is_a_row_and_the_run_goes_on(finished_run):
    out, _ = finished_run
    results = pd.read_csv(out / "results.csv").set_index("model")
    assert results.loc["torchvision/inception_v3", "status"] == "failed"
    assert "Kernel size can't be greater" in results.loc["torchvision/inception_v3", "error"]
    assert results.loc["timm/test_convnext", "status"] == "ok"  # listed after the failure
    with sqlite3.connect(out / "bakeoff.db") as db:
        rows = db.execute("SELECT model, status, result FROM trials").fetchall()
    assert sorted((m, s) for m, s, _ in rows) == [("timm/test_convnext", "ok"), ("timm/test_efficientnet", "ok"),
                                                  ("timm/test_resnet", "ok"), ("torchvision/inception_v3", "failed")]
    result = json.loads(next(r for m, _, r in rows if m == "timm/test_resnet"))
    # A worker runs trial after trial and keeps the decoded images between them (trials that want
    # the same image size run one after another); a failed trial ends its worker, so the trial
    # after a failure starts a fresh process and loads the images again.
    with sqlite3.connect(out / "bakeoff.db") as db:
        order = [m for m, in db.execute("SELECT model FROM trials ORDER BY started")]
    reused = {m: json.loads(r)["data_reused"] for m, s, r in rows if s == "ok"}
    after_failure = order[order.index("torchvision/inception_v3") + 1:order.index("torchvision/inception_v3") + 2]
    assert reused[order[0]] is False and all(reused[m] is (m not in after_failure) for m in order[1:] if m in reused)
    assert sum(reused.values()) >= 1
    assert results.loc[order[0], "data_resident"] == "ram" and not results.loc[order[0], "data_reused"]
    assert len(result["history"]) == 3 and result["weights"] == "random-init"
    assert len(result["confusion_matrix"]) == 3 and set(result["per_class_accuracy"]) == {"blue", "green", "red"}
    assert result["latency_runs"] >= 50


def test_saved_model_reloads_and_predicts_the_same(finished_run):
    out, _ = finished_run
    model, meta, classes = load_saved(out / "models" / "timm__test_resnet")
    assert classes == ["blue", "green", "red"] and meta["input_size"] == 32
    assert sum(p.numel() for p in model.parameters()) == int(
        pd.read_csv(out / "results.csv").set_index("model").loc["timm/test_resnet", "params"])


def test_resume_trains_nothing_twice(finished_run, shared_colour_folder):
    out, _ = finished_run
    with sqlite3.connect(out / "bakeoff.db") as db:
        before = dict(db.execute("SELECT model, finished FROM trials WHERE status='ok'").fetchall())
    again = run_comparison(shared_colour_folder, ["timm/test_resnet", "timm/test_efficientnet"], out=out,
                           **(TINY | {"epochs": 3}))
    assert again.run["counts"] == {"trained": 0, "resumed": 2, "failed": 0}
    with sqlite3.connect(out / "bakeoff.db") as db:
        after = dict(db.execute("SELECT model, finished FROM trials WHERE status='ok'").fetchall())
    assert after == before


def test_report_rebuilds_with_another_baseline(finished_run):
    out, _ = finished_run
    (out / "relative.csv").unlink()
    df = report(out, baseline="timm/test_efficientnet")
    rel = pd.read_csv(out / "relative.csv").set_index("model")
    assert rel.loc["timm/test_efficientnet", "relative_accuracy"] == 1.0
    with sqlite3.connect(out / "bakeoff.db") as db:  # one row per model of the latest run, whichever it was
        latest = json.loads(db.execute("SELECT trial_keys FROM runs ORDER BY id DESC LIMIT 1").fetchone()[0])
    assert bool(rel.loc["timm/test_efficientnet", "baseline"]) and list(df["model"]) == list(latest)
    report(out)  # and back to the run's own default


def test_protocol_change_is_a_new_trial(finished_run, shared_colour_folder):
    out, _ = finished_run
    other = run_comparison(shared_colour_folder, ["timm/test_resnet"], out=out, **(TINY | {"epochs": 1}))
    assert other.run["counts"] == {"trained": 1, "resumed": 0, "failed": 0}
    report(out)


def test_api_rejects_bad_arguments(colour_folder, tmp_path):
    with pytest.raises(BakeoffError, match="no models"):
        run_comparison(colour_folder, [], out=tmp_path / "o", **TINY)
    with pytest.raises(BakeoffError, match="--baseline"):
        run_comparison(colour_folder, ["timm/test_resnet"], baseline="timm/test_vit", out=tmp_path / "o", **TINY)
    with pytest.raises(BakeoffError, match="--epochs"):
        run_comparison(colour_folder, ["timm/test_resnet"], out=tmp_path / "o", **(TINY | {"epochs": 0}))


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(BAKEOFF + [str(a) for a in args], capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("make_args, message", [
    (lambda p: ["run", p / "missing", "--models", "timm/test_resnet"], "does not exist"),
    (lambda p: ["run", p / "data", "--models", "pytorch-ic-resnet43"], "closest: pytorch-ic-resnet34"),
    (lambda p: ["run", p / "data", "--models", "timm/test_resnet", "--val-dir", p / "missing"], "does not exist"),
    (lambda p: ["report", p / "nothing-here"], "does not exist"),
    (lambda p: ["run", p / "data", "--models", "pytorch-ic-resnet34", "--out", p / "o"], "--no-pretrained"),
    (lambda p: ["run", p / "data", "--models", "timm/test_resnet", "--compile", "always"],
     "--compile must be one of auto, off"),
])
def test_cli_bad_input_is_one_line_exit_2_no_traceback(tmp_path, colour_folder, make_args, message):
    proc = _cli(*make_args(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1


def test_cli_run_prints_the_table_and_interrupt_keeps_finished_work(tmp_path, colour_folder):
    out = tmp_path / "out"
    args = ["run", colour_folder, "--models", "timm/test_resnet,timm/test_efficientnet", "--out", out,
            "--no-pretrained", "--image-size", "32", "--epochs", "1", "--device", "cpu"]
    proc = subprocess.Popen(BAKEOFF + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for the first trial to be stored, then press Ctrl-C
        if (out / "bakeoff.db").exists():
            with sqlite3.connect(out / "bakeoff.db") as db:
                if db.execute("SELECT count(*) FROM trials").fetchone()[0] >= 1:
                    break
        time.sleep(0.2)
    t_int = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # the second trial won the race: nothing left to interrupt
        with sqlite3.connect(out / "bakeoff.db") as db:
            rows = db.execute("SELECT model, started, finished FROM trials").fetchall()
        pytest.skip(f"run finished before the interrupt: {[(m, round(s - t_int, 2), round(f - t_int, 2)) for m, s, f in rows]}"
                    f" exit {time.time() - t_int:.2f}; {err[-400:]!r}")
    assert proc.returncode == 130 and "resume" in err and "Traceback" not in err
    with sqlite3.connect(out / "bakeoff.db") as db:
        assert db.execute("SELECT model FROM trials WHERE status='ok'").fetchall() == [("timm/test_resnet",)]
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    assert "trained 1, already done 1, failed 0" in done.stdout.replace("\n", " ")
    assert "timm/test_resnet" in done.stdout and "relative to" in done.stdout


def test_val_every_skips_evaluations_and_trains_the_same(shared_colour_folder, tmp_path):
    # validated after each of 3 epochs, then only after the last: evaluating changes no training,
    # so the per-epoch training figures and the final accuracy are the same
    runs = {n: run_comparison(shared_colour_folder, ["timm/test_resnet"], out=tmp_path / f"every{n}",
                              **(TINY | {"epochs": 3}), val_every=n) for n in (1, 3)}
    assert runs[3].run["protocol"]["val_every"] == 3
    out = tmp_path / "every3"

    def history(folder):
        _, trials = Store(folder / "bakeoff.db").latest_trials()
        return trials[0]["result"]["history"]

    sparse, full = history(out), history(tmp_path / "every1")
    assert [h["val_accuracy"] is None for h in sparse] == [True, True, False]
    assert [h["val_accuracy"] is None for h in full] == [False, False, False]
    assert [h["train_loss"] for h in sparse] == [h["train_loss"] for h in full]
    assert sparse[-1]["val_accuracy"] == full[-1]["val_accuracy"]
    assert sum(h["eval_time_s"] for h in sparse[:2]) < 0.01
    assert "scored every 3 epochs and after the last" in (out / "report.md").read_text()
    with pytest.raises(BakeoffError, match="--val-every must be at least 1"):
        Protocol(val_every=0)
    assert [Protocol(epochs=5, val_every=2).validates(e) for e in range(5)] == [False, True, False, True, True]
    # the default validation, with eager kernels, leaves the trial keys of earlier runs as they were
    legacy = {k: v for k, v in Protocol().to_dict().items() if k not in ("val_every", "compile")}
    eager = Protocol(compile="off")
    assert eager.key() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    assert Protocol(val_every=2).key() != Protocol().key()
    assert Protocol(val_every=2, compile="off").key() != eager.key()


def test_a_learning_rate_that_wrecks_training_is_reported_as_at_chance(tmp_path, shared_colour_folder):
    # lr 10 drives the model to one answer for every image: the run finishes, and says so plainly
    out = tmp_path / "out"
    proc = _cli("run", shared_colour_folder, "--models", "timm/test_resnet", "--out", out, "--no-pretrained",
                "--image-size", "32", "--epochs", "2", "--lr", "10", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    row = pd.read_csv(out / "results.csv").iloc[0]
    assert row["status"] == "ok" and not row["above_chance"]
    assert row["accuracy"] <= row["chance_accuracy"] == pytest.approx(1 / 3)
    text = " ".join(proc.stdout.split())
    assert "not distinguishable from chance" in text and "try a lower --lr" in text
    assert "nothing to recommend" in (out / "report.md").read_text()


def test_train_only_top_layer_trains_the_head_on_features_computed_once(shared_colour_folder, tmp_path):
    import torch

    from bakeoff.engines.torch.build import build_model
    from bakeoff.zoo import resolve

    out = tmp_path / "top"
    run_comparison(shared_colour_folder, ["timm/test_resnet"], out=out,
                   **(TINY | {"epochs": 4, "lr": 0.01, "train_only_top_layer": True}))
    row = pd.read_csv(out / "results.csv").iloc[0]
    assert row["status"] == "ok" and row["step_mode"].startswith("cached-features")
    assert row["accuracy"] > 0.5  # chance is 1/3: the head learnt from the frozen features
    # The backbone is exactly its seeded initial state; only the classifier moved.
    torch.manual_seed(0)
    start, _ = build_model(resolve("timm/test_resnet"), 3, pretrained=False)
    model, _, _ = load_saved(next((out / "models").iterdir()))
    before, after = start.state_dict(), model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"fc.weight", "fc.bias"}



def test_which_trials_a_worker_runs_after_another():
    from bakeoff.job import TrialJob
    from bakeoff.trial import reusable_after

    def job(framework="pytorch", device="cpu", top=False):
        return TrialJob(spec={"framework": framework}, protocol={"train_only_top_layer": top}, cache_path="",
                        input_size=8, labels=None, train_idx=None, val_idx=None, classes=[], out_dir="",
                        device=device)

    assert reusable_after(job()) and reusable_after(job(device="cuda:0", top=True))
    assert not reusable_after(job(device="cuda:0")) and not reusable_after(job("tensorflow"))


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
        folder = m.replace("/", "__")
        w_alone = load_saved(alone / "models" / folder)[0].state_dict()
        w_shared = load_saved(shared / "models" / folder)[0].state_dict()
        assert all(torch.allclose(w_alone[k].float(), w_shared[k].float(), atol=1e-5) for k in w_alone), m


def _fake_run(tmp_path, beside: dict | None = None, n=3):
    """``n`` jobs for ``stand_in_worker`` (m0, m1, ...; ``beside``: model -> what it does
    beside others), a store and a started run."""
    import numpy as np

    from bakeoff.store import Store
    from bakeoff.job import TrialJob

    tmp_path.mkdir(parents=True, exist_ok=True)
    jobs = [TrialJob(spec={"id": f"m{i}", "framework": "pytorch", "beside": (beside or {}).get(f"m{i}", "ok")},
                     protocol={}, cache_path="", input_size=8, labels=np.zeros(4, dtype=np.int64),
                     train_idx=np.arange(2), val_idx=np.arange(2, 4), classes=["a"], out_dir=str(tmp_path),
                     device="cpu", key=f"k{i}") for i in range(n)]
    store = Store(tmp_path / "bakeoff.db")
    return jobs, store, store.start_run("test", None, {j.spec["id"]: j.key for j in jobs}, {}, {}, {})


def test_a_trial_that_cannot_share_the_gpu_runs_again_alone(tmp_path):
    from bakeoff.runners.local import run_local

    jobs, store, run_id = _fake_run(tmp_path, {"m0": "alone", "m1": "alone", "m2": "alone"})
    counts = run_local(jobs, store, run_id, devices=["cpu"], per_device=3, target=stand_in_worker)
    assert counts == {"trained": 3, "resumed": 0, "failed": 0}
    rows = {t["model"]: t for t in store.trials()}
    assert set(rows) == {"m0", "m1", "m2"}
    for row in rows.values():
        result = row["result"] if isinstance(row["result"], dict) else json.loads(row["result"])
        assert result["concurrent_trials_seen"] == 1  # the second time, in a process of its own
        assert "capture failed" in result["shared_gpu_error"]


def test_a_sharing_worker_hears_when_no_more_trials_will_come(tmp_path):
    from bakeoff.runners.local import run_local

    jobs, store, run_id = _fake_run(tmp_path, n=5)
    counts = run_local(jobs, store, run_id, devices=["cpu"], per_device=3, target=stand_in_worker)
    assert counts["trained"] == 5
    # Told once, after the fifth trial was handed over (the trials it runs then keep pace).
    messages = (tmp_path / "messages.txt").read_text().split()
    assert sorted(messages[:5]) == ["m0", "m1", "m2", "m3", "m4"] and messages[5:] == ["last"]


def test_a_worker_started_early_runs_the_first_trials_or_is_stopped(tmp_path):
    import multiprocessing as mp

    from bakeoff.runners.local import _Worker, run_local

    jobs, store, run_id = _fake_run(tmp_path)
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

    jobs, store, run_id = _fake_run(tmp_path)  # full fine-tunes: on a GPU, each ends its process
    counts = run_local(jobs, store, run_id, devices=["cuda:0"], per_device=1, target=stand_in_worker)
    assert counts["trained"] == 3
    rows = sorted(store.trials(), key=lambda t: t["started"])
    results = [r["result"] if isinstance(r["result"], dict) else json.loads(r["result"]) for r in rows]
    assert len({r["pid"] for r in results}) == 3  # a fresh process for each trial
    # the second and third were started (and warmed on their GPU) while the one before trained
    assert [r["prewarm"] for r in results] == [None, "cuda:0", "cuda:0"]
    assert not mp.active_children()  # no spare process is left behind


def test_auto_packs_full_fine_tunes_by_gpu_memory_and_runs_top_only_trials_alone(monkeypatch):
    from types import SimpleNamespace

    import torch

    from bakeoff.api import _gpu_slots

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (80 * 2**30, 80 * 2**30))
    cuda, small = torch.device("cuda"), SimpleNamespace(files=["x.jpg"] * 1000)
    sides = [(224, 256, "bilinear")]
    assert _gpu_slots("auto", cuda, "auto", small, sides) == (["cuda:0", "cuda:1"], 8)
    assert _gpu_slots("auto", cuda, "auto", small, sides, top_only=True) == (["cuda:0", "cuda:1"], 1)
    # 55k images at 342 px, twice (stored and resized): 38.6 GB of the 72 GB usable, 8 GB a trial
    big = SimpleNamespace(files=["x.jpg"] * 55_000)
    assert _gpu_slots("auto", cuda, "auto", big, [(299, 342, "bilinear")]) == (["cuda:0", "cuda:1"], 4)
    assert _gpu_slots("cuda:1", torch.device("cuda:1"), "3", big, sides) == (["cuda:1"], 3)
    assert _gpu_slots("cpu", torch.device("cpu"), "auto", big, sides) == (None, 1)
    for bad in ("0", "many"):
        with pytest.raises(BakeoffError, match="--trials-per-gpu"):
            _gpu_slots("auto", cuda, bad, small, sides)


def test_a_gpu_gets_no_more_places_than_trials_to_fill_them(tmp_path):
    from bakeoff.runners.local import run_local

    for devices, expected in ((["cpu"], 3), (["cpu", "cpu"], 2)):
        jobs, store, run_id = _fake_run(tmp_path / str(len(devices)))
        run_local(jobs, store, run_id, devices=devices, per_device=8, target=stand_in_worker)
        assert {t["result"]["concurrent_trials"] for t in store.trials()} == {expected}, devices


def test_a_run_scans_the_data_folder_once_and_records_how_long(colour_folder, tmp_path, monkeypatch):
    import bakeoff.api
    import bakeoff.data.prepare
    from bakeoff.data.scan import scan_folder

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0])
        return scan_folder(*args, **kwargs)

    monkeypatch.setattr(bakeoff.api, "scan_folder", counting)
    monkeypatch.setattr(bakeoff.data.prepare, "scan_folder", counting)
    run_comparison(colour_folder, ["timm/test_resnet"], out=tmp_path / "out", **(TINY | {"epochs": 1}))
    assert calls == [colour_folder]
    summary = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert summary["scan_time_s"] > 0 and summary["decode_time_s"] > 0 and summary["n_train"] > 0


@pytest.mark.parametrize("crash", [False, True])
def test_a_trial_that_fails_beside_others_runs_again_alone(tmp_path, crash):
    from bakeoff.runners.local import run_local

    jobs, store, run_id = _fake_run(tmp_path, {"m1": "crash" if crash else "error"})
    counts = run_local(jobs, store, run_id, devices=["cpu"], per_device=3, target=stand_in_worker)
    assert counts == {"trained": 3, "resumed": 0, "failed": 0}
    rows = {t["model"]: t["result"] for t in store.trials()}
    assert rows["m0"]["concurrent_trials_seen"] == 3 and rows["m0"]["shared_gpu_error"] is None
    assert rows["m1"]["concurrent_trials_seen"] == 1
    why = "trial process died with exit code 3" if crash else "out of memory"
    assert rows["m1"]["shared_gpu_error"].startswith("failed beside other trials: ") and why in rows["m1"]["shared_gpu_error"]
    # a crash takes down the trials running beside it too: m2 (queued behind m1) reruns alone
    assert (rows["m2"]["shared_gpu_error"] is not None) == crash
