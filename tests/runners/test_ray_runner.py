"""Trials on a real Ray cluster (started here, on loopback, 2 CPUs): same figures as the local
executor, a worker killed mid-trial is retried, failures become rows, Ctrl-C cancels, resume."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from bakeoff.api import run_comparison  # noqa: E402
from bakeoff.runners.ray_runner import MAX_RETRIES, TOKEN_FILE, _trial_task, _write_files, run_ray  # noqa: E402
from bakeoff.store import Store  # noqa: E402
from bakeoff.job import TrialJob  # noqa: E402
from bakeoff.trial import trial_process_main  # noqa: E402
from conftest import make_colour_folder, process_alive, wait_for  # noqa: E402

# The hooks below run inside Ray workers, which cannot import this test module: ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

MODELS = ["timm/test_resnet", "timm/test_efficientnet"]
SETTINGS = dict(epochs=1, lr=0.002, batch_size=16, image_size=32, pretrained=False, progress=False, device="cpu")
# Figures that depend only on the seed and the data, not on the machine's speed.
EXACT = ["accuracy", "accuracy_ci_low", "accuracy_ci_high", "top5", "macro_f1", "per_class_accuracy",
         "confusion_matrix", "n_val", "params", "input_size", "precision"]
EXACT_HISTORY = ["epoch", "train_accuracy", "val_accuracy"]
# A Ray task computes with the CPUs Ray gives it (OMP_NUM_THREADS), a local trial with every core:
# the same arithmetic summed in another order, equal to float32 rounding.
CLOSE_HISTORY = ["train_loss", "val_loss"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("ray") / "data", per_class=10)


class KillOnce:
    """Trial entry that SIGKILLs its own worker at the first training step of ``model``, once."""

    def __init__(self, model: str, marker: Path) -> None:
        self.model, self.marker = model, marker

    def __call__(self, job, queue) -> None:
        entry = self

        class Killer:
            def put(self, msg):
                if msg[0] == "step" and job.spec["id"] == entry.model and not entry.marker.exists():
                    entry.marker.write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)
                queue.put(msg)

        trial_process_main(job, Killer())


def _results(out: Path) -> dict:
    return {t["model"]: t for t in Store(out / "bakeoff.db").trials()}


def test_ray_matches_local_and_retries_a_killed_worker(cluster, data, tmp_path, monkeypatch):
    local = run_comparison(data, MODELS, out=tmp_path / "local", **SETTINGS)
    assert local.run["counts"] == {"trained": 2, "resumed": 0, "failed": 0}

    # Two trials at a time on the 2-CPU cluster; the first training step of test_resnet kills its worker.
    monkeypatch.setenv("BAKEOFF_RAY_CPUS_PER_TRIAL", "1")
    marker = tmp_path / "killed"
    monkeypatch.setattr("bakeoff.runners.ray_runner.trial_process_main", KillOnce("timm/test_resnet", marker))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    on_ray = run_comparison(data, MODELS, out=tmp_path / "ray", executor="ray", mlflow_uri=uri, **SETTINGS)
    assert marker.exists(), "the worker was never killed"
    assert on_ray.run["counts"] == {"trained": 2, "resumed": 0, "failed": 0}

    rows = Store(tmp_path / "ray" / "bakeoff.db").trials()
    assert sorted(r["model"] for r in rows) == sorted(MODELS)  # exactly one row per model
    a, b = _results(tmp_path / "local"), _results(tmp_path / "ray")
    for model in MODELS:
        assert b[model]["status"] == "ok" and b[model]["key"] == a[model]["key"]
        ra, rb = a[model]["result"], b[model]["result"]
        for k in EXACT:
            assert ra[k] == rb[k], (model, k)
        assert [{k: e[k] for k in EXACT_HISTORY} for e in ra["history"]] == \
               [{k: e[k] for k in EXACT_HISTORY} for e in rb["history"]]
        assert [[e[k] for k in CLOSE_HISTORY] for e in rb["history"]] == \
               [pytest.approx([e[k] for k in CLOSE_HISTORY], rel=1e-5) for e in ra["history"]]
        assert (tmp_path / "ray" / rb["model_dir"] / "weights.pt").is_file()
    assert not (tmp_path / "ray" / TOKEN_FILE).exists()
    assert list(on_ray.frame()["accuracy"]) == list(local.frame()["accuracy"])

    # MLflow lists one run per model, with its figures and its training curve.
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(on_ray.run["mlflow_experiment"])
    runs = {r.data.tags["bakeoff.model"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == sorted(MODELS)
    for model, r in runs.items():
        assert r.info.status == "FINISHED" and r.data.metrics["accuracy"] == b[model]["result"]["accuracy"]
        curve = client.get_metric_history(r.info.run_id, "val_accuracy")
        assert [(m.step, m.value) for m in curve] == [(1, b[model]["result"]["history"][0]["val_accuracy"])]

    # Re-running resumes: nothing is trained again and no row is added.
    again = run_comparison(data, MODELS, out=tmp_path / "ray", executor="ray", **SETTINGS)
    assert again.run["counts"] == {"trained": 0, "resumed": 2, "failed": 0}
    assert len(Store(tmp_path / "ray" / "bakeoff.db").trials()) == 2


def _fake_jobs(tmp_path: Path, names: list[str]) -> list[TrialJob]:
    cache = tmp_path / "cache" / tmp_path.name / "s8-bilinear.npy"
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3))
    return [TrialJob(spec={"id": n, "framework": "pytorch"}, protocol={}, cache_path=str(cache), input_size=8,
                     labels=np.array([0, 1, 0, 1]), train_idx=np.array([0, 1]), val_idx=np.array([2, 3]),
                     classes=["a", "b"], out_dir=str(tmp_path), device="cpu", key=f"key-{n}") for n in names]


def quick_or_dead(job, queue) -> None:
    """``ok``: returns at once; ``dies``: its worker is killed every time; ``hangs``: sleeps."""
    name = job.spec["id"]
    if name == "dies":
        os.kill(os.getpid(), signal.SIGKILL)
    if name == "hangs":
        Path(job.out_dir, "hangs.pid").write_text(str(os.getpid()))
        time.sleep(120)
    queue.put(("result", job.key, {"accuracy": 1.0, "pid": os.getpid()}))


def test_dead_worker_beyond_retries_becomes_a_failed_row(cluster, tmp_path):
    store = Store(tmp_path / "bakeoff.db")
    events = []
    counts = run_ray(_fake_jobs(tmp_path, ["ok", "dies"]), store, 1, lambda k, j, p: events.append((k, j.spec["id"])),
                     entry=quick_or_dead)
    assert counts == {"trained": 1, "resumed": 0, "failed": 1}
    rows = {r["model"]: r for r in store.trials()}
    assert rows["ok"]["status"] == "ok" and rows["ok"]["result"]["accuracy"] == 1.0
    assert rows["dies"]["status"] == "failed"
    assert f"died {MAX_RETRIES + 1} times" in rows["dies"]["error"]
    assert ("done", "ok") in events and ("failed", "dies") in events


def test_ctrl_c_cancels_outstanding_trials_and_keeps_finished(cluster, tmp_path):
    store = Store(tmp_path / "bakeoff.db")

    def on_event(kind, job, payload):
        if kind == "done":
            # Wait until the other trial is running, then interrupt as Ctrl-C would.
            deadline = time.time() + 30
            while not (tmp_path / "hangs.pid").exists() and time.time() < deadline:
                time.sleep(0.1)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ray(_fake_jobs(tmp_path, ["ok", "hangs"]), store, 1, on_event, entry=quick_or_dead, progress=False)
    assert [r["model"] for r in store.trials()] == ["ok"]
    pid = int((tmp_path / "hangs.pid").read_text())
    wait_for(lambda: not process_alive(pid), 20, "the hanging trial's worker to be cancelled")


def test_worker_off_the_shared_disk_gets_cache_from_object_store_and_ships_model_back(cluster, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-tmp"))  # the "node's" disk
    (tmp_path / "node-tmp").mkdir()
    job = _fake_jobs(tmp_path / "driver", ["m"])[0]
    expected = np.load(job.cache_path)
    ref = ray.put(expected)
    size = Path(job.cache_path).stat().st_size
    job.cache_path = str(tmp_path / "elsewhere" / tmp_path.name / "s8-bilinear.npy")  # not readable "on this node"
    seen = {}

    def entry(j, queue):
        seen["cache"] = np.load(j.cache_path)
        seen["out_dir"] = j.out_dir
        folder = Path(j.out_dir) / "models" / "m"
        folder.mkdir(parents=True)
        (folder / "weights.pt").write_bytes(b"weights")
        queue.put(("result", j.key, {"model_dir": "models/m"}))

    out = _trial_task(entry, job, ([ref], size), "not-the-driver-token", None)
    np.testing.assert_array_equal(seen["cache"], expected)
    assert list((tmp_path / "node-tmp" / "bakeoff-cache").rglob("*.npy"))  # kept for the node's next trials
    assert seen["out_dir"] != job.out_dir and not Path(seen["out_dir"]).exists()  # scratch, cleaned up
    assert out["kind"] == "result" and out["files"] == {"models/m/weights.pt": b"weights"}
    _write_files(job.out_dir, out["files"])
    assert (Path(job.out_dir) / "models" / "m" / "weights.pt").read_bytes() == b"weights"
