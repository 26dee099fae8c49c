"""MLflow tracking against a real store (SQLite backend in a temp folder): one experiment per
bakeoff run, one MLflow run per trial with params, metrics, per-epoch curves and artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from bakeoff.api import run_comparison  # noqa: E402
from bakeoff.errors import BakeoffError  # noqa: E402
from bakeoff.store import Store  # noqa: E402
from bakeoff.tracking import experiment_name, log_run  # noqa: E402
from conftest import make_colour_folder  # noqa: E402

MODELS = ["timm/test_resnet", "timm/test_efficientnet"]


def _result(model: str, acc: float, out_dir: str) -> dict:
    """A trial's result row as the engine writes it (figures made up, shape real)."""
    folder = Path(out_dir) / "models" / model.replace("/", "__")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.pt").write_bytes(b"w" * 10)
    (folder / "spec.json").write_text("{}")
    return {"model": model, "framework": "pytorch", "status": "ok", "accuracy": acc, "accuracy_ci_low": acc - 0.1,
            "accuracy_ci_high": acc + 0.05, "top5": 1.0, "macro_f1": acc, "train_time_s": 2.0, "latency_ms_p50": 1.5,
            "latency_ms_p95": 2.5, "throughput_img_s": 900.0, "params": 1234, "size_mb": 0.01,
            "per_class_accuracy": {"blue": 1.0, "green": None, "red sky": 0.5}, "confusion_matrix": [[1, 0], [0, 1]],
            "history": [{"epoch": 1, "train_loss": 1.2, "val_accuracy": 0.5, "epoch_time_s": 1.0},
                        {"epoch": 2, "train_loss": 0.8, "val_accuracy": acc, "epoch_time_s": 1.0}],
            "precision": "fp32", "channels_last": False, "device_name": "CPU: test",
            "model_dir": str(folder.relative_to(out_dir))}


def fake_runner(jobs, store, run_id, *args, **kwargs):
    """Stands in for training: the first model succeeds, the second fails."""
    ok, failed = jobs
    store.save_trial(ok.key, run_id, ok.spec["id"], "pytorch", "ok", 1_700_000_000.0,
                     result=_result(ok.spec["id"], 0.75, ok.out_dir))
    store.save_trial(failed.key, run_id, failed.spec["id"], "pytorch", "failed", 1_700_000_000.0,
                     error="RuntimeError: out of memory", traceback="Traceback ...")
    return {"trained": 1, "resumed": 0, "failed": 1}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run of two models (one failed) logged through MLFLOW_TRACKING_URI."""
    tmp_path = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr("bakeoff.api.run_local", fake_runner)
        data = make_colour_folder(tmp_path / "data", per_class=6, size=16)
        out = tmp_path / "out"
        comparison = run_comparison(data, MODELS, out=out, epochs=2, image_size=32, pretrained=False,
                                    progress=False, device="cpu")
    return uri, out, comparison


def test_one_mlflow_run_per_trial_with_metrics_curves_params_and_artifacts(logged):
    uri, out, comparison = logged
    name = comparison.run["mlflow_experiment"]
    assert name == experiment_name(out, Store(out / "bakeoff.db").latest_run())
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[name])
    assert sorted(runs["tags.mlflow.runName"]) == sorted(MODELS)
    ok = runs[runs["tags.bakeoff.model"] == MODELS[0]].iloc[0]
    assert ok["status"] == "FINISHED"
    assert ok["metrics.accuracy"] == 0.75 and ok["metrics.latency_ms_p50"] == 1.5
    assert ok["metrics.per_class_accuracy/red sky"] == 0.5
    assert ok["params.protocol.epochs"] == "2" and ok["params.protocol.optimizer"] == "adam"
    assert ok["params.model.architecture"] == "test_resnet"
    assert ok["tags.bakeoff.precision"] == "fp32"

    client = mlflow.tracking.MlflowClient(uri)
    curve = client.get_metric_history(ok["run_id"], "val_accuracy")
    assert [(m.step, m.value) for m in sorted(curve, key=lambda m: m.step)] == [(1, 0.5), (2, 0.75)]
    artifacts = {f.path for d in ("plots", "report", "model") for f in client.list_artifacts(ok["run_id"], d)}
    assert {"plots/accuracy_vs_training_time.png", "report/results.csv", "model/weights.pt"} <= artifacts
    assert (out / "plots" / "accuracy_vs_training_time.png").is_file()

    failed = runs[runs["tags.bakeoff.model"] == MODELS[1]].iloc[0]
    assert failed["status"] == "FAILED"
    assert failed["tags.bakeoff.error"] == "RuntimeError: out of memory"
    assert {f.path for f in client.list_artifacts(failed["run_id"], "model")} == set()


def test_logging_the_same_run_again_adds_nothing(logged):
    uri, out, comparison = logged
    assert log_run(out, uri) == comparison.run["mlflow_experiment"]
    mlflow.set_tracking_uri(uri)
    assert len(mlflow.search_runs(experiment_names=[comparison.run["mlflow_experiment"]])) == 2


def test_unreachable_tracking_server_is_a_one_line_error_and_keeps_results(logged, monkeypatch):
    _, out, _ = logged
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(BakeoffError, match="could not log to MLflow at http://127.0.0.1:9.*saved in"):
        log_run(out, "http://127.0.0.1:9")
    assert (out / "results.csv").is_file()
