"""The Python API end to end: a real (tiny) comparison, its outputs, resume and report; the
arguments it refuses; how it packs trials onto GPUs; one scan of the data folder."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pandas as pd
import pytest

from bakeoff.api import report, run_comparison
from bakeoff.engines.torch.trial import load_saved
from bakeoff.errors import BakeoffError
from conftest import TINY

REQUIRED = ["model", "framework", "status", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "p_vs_baseline", "n_val",
            "top5", "macro_f1", "train_time_s", "train_time_kind", "setup_time_s", "latency_ms_p50", "latency_ms_p95",
            "latency_kind", "throughput_img_s", "params", "size_mb"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shared_colour_folder):
    out = tmp_path_factory.mktemp("run") / "out"
    comparison = run_comparison(shared_colour_folder, ["timm/test_resnet", "timm/test_efficientnet",
                                                       "torchvision/vit_b_16", "timm/test_convnext"],
                                out=out, **(TINY | {"epochs": 3}))
    return out, comparison


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """The finished run's folder copied, for a test that resumes into it or rewrites its outputs:
    the other tests read the run as it finished, whatever order they run in."""
    return shutil.copytree(finished_run[0], tmp_path / "out")


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
    assert results.loc["torchvision/vit_b_16", "status"] == "failed"
    assert "Wrong image height" in results.loc["torchvision/vit_b_16", "error"]  # a fixed-size network at 32 px
    assert results.loc["timm/test_convnext", "status"] == "ok"  # listed after the failure
    with sqlite3.connect(out / "bakeoff.db") as db:
        rows = db.execute("SELECT model, status, result FROM trials").fetchall()
    assert sorted((m, s) for m, s, _ in rows) == [("timm/test_convnext", "ok"), ("timm/test_efficientnet", "ok"),
                                                  ("timm/test_resnet", "ok"), ("torchvision/vit_b_16", "failed")]
    result = json.loads(next(r for m, _, r in rows if m == "timm/test_resnet"))
    # A worker runs trial after trial and keeps the decoded images between them (trials that want
    # the same image size run one after another); a failed trial ends its worker, so the trial
    # after a failure starts a fresh process and loads the images again.
    with sqlite3.connect(out / "bakeoff.db") as db:
        order = [m for m, in db.execute("SELECT model FROM trials ORDER BY started")]
    reused = {m: json.loads(r)["data_reused"] for m, s, r in rows if s == "ok"}
    after_failure = order[order.index("torchvision/vit_b_16") + 1:order.index("torchvision/vit_b_16") + 2]
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


def test_resume_trains_nothing_twice(run_copy, shared_colour_folder):
    out = run_copy
    with sqlite3.connect(out / "bakeoff.db") as db:
        before = dict(db.execute("SELECT model, finished FROM trials WHERE status='ok'").fetchall())
    again = run_comparison(shared_colour_folder, ["timm/test_resnet", "timm/test_efficientnet"], out=out,
                           **(TINY | {"epochs": 3}))
    assert again.run["counts"] == {"trained": 0, "resumed": 2, "failed": 0}
    with sqlite3.connect(out / "bakeoff.db") as db:
        after = dict(db.execute("SELECT model, finished FROM trials WHERE status='ok'").fetchall())
    assert after == before


def test_report_rebuilds_with_another_baseline(run_copy):
    out = run_copy
    (out / "relative.csv").unlink()
    df = report(out, baseline="timm/test_efficientnet")
    rel = pd.read_csv(out / "relative.csv").set_index("model")
    assert rel.loc["timm/test_efficientnet", "relative_accuracy"] == 1.0
    with sqlite3.connect(out / "bakeoff.db") as db:  # one row per model of the latest run, whichever it was
        latest = json.loads(db.execute("SELECT trial_keys FROM runs ORDER BY id DESC LIMIT 1").fetchone()[0])
    assert bool(rel.loc["timm/test_efficientnet", "baseline"]) and list(df["model"]) == list(latest)
    report(out)  # and back to the run's own default


def test_protocol_change_is_a_new_trial(run_copy, shared_colour_folder):
    out = run_copy
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


def test_the_api_refuses_repeats_that_are_not_a_whole_number_from_1(shared_colour_folder, tmp_path):
    for bad in (0, -2, 1.5, "3", True):
        with pytest.raises(BakeoffError, match="--repeats must be a whole number from 1"):
            run_comparison(shared_colour_folder, ["timm/test_resnet"], out=tmp_path / "out", repeats=bad)
    with pytest.raises(BakeoffError, match="runs past the largest seed"):
        run_comparison(shared_colour_folder, ["timm/test_resnet"], out=tmp_path / "out", seed=2**32 - 1, repeats=2)
    for bad in (0, "two", True):  # before the images are decoded: no output folder yet
        with pytest.raises(BakeoffError, match="--keras-per-gpu must be a whole number from 1 or auto"):
            run_comparison(shared_colour_folder, ["timm/test_resnet"], out=tmp_path / "k", keras_per_gpu=bad)
        assert not (tmp_path / "k").exists()


def test_bad_executor_or_address_is_a_one_line_error(shared_colour_folder, tmp_path):
    # Not beside the Ray runner's tests: once their cluster runs, a run joins it whatever the address.
    ray = pytest.importorskip("ray")
    models, settings = ["timm/test_resnet", "timm/test_efficientnet"], TINY | {"epochs": 1}
    with pytest.raises(BakeoffError, match="--executor must be local or ray"):
        run_comparison(shared_colour_folder, models, out=tmp_path / "out", executor="slurm", **settings)
    with pytest.raises(BakeoffError, match="no Ray cluster answers at 127.0.0.1:1 .*ray start --head"):
        run_comparison(shared_colour_folder, models, out=tmp_path / "out", executor="ray", ray_address="127.0.0.1:1",
                       **settings)
    assert not ray.is_initialized()
