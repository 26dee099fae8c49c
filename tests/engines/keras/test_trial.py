"""A Keras trial: Keras and PyTorch models in one comparison, measured on the same validation
images, and a saved Keras model that loads back with its preprocessing."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from bakeoff.api import run_comparison
from bakeoff.errors import BakeoffError
from bakeoff.store import Store
from conftest import TF_MOBILENET, TINY, keras_numpy

if importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow") is None:
    pytest.skip("needs bakeoff[tensorflow]", allow_module_level=True)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, shared_colour_folder):
    out = tmp_path_factory.mktemp("keras-run") / "out"
    run_comparison(shared_colour_folder, [TF_MOBILENET, "timm/test_resnet"], out=out,
                   baseline=TF_MOBILENET, **(TINY | {"epochs": 1}))
    return out


def test_keras_and_pytorch_models_train_in_one_comparison(mixed_run):
    out = mixed_run
    results = pd.read_csv(out / "results.csv").set_index("model")
    assert list(results["status"]) == ["ok", "ok"], results["error"].tolist()
    assert results.loc[TF_MOBILENET, "framework"] == "tensorflow"
    assert results.loc["timm/test_resnet", "framework"] == "pytorch"
    tf_row = results.loc[TF_MOBILENET]
    assert tf_row["backend"] == "tensorflow" and tf_row["latency_kind"].startswith("compiled")
    assert tf_row["accuracy_ci_low"] <= tf_row["accuracy"] <= tf_row["accuracy_ci_high"]
    assert tf_row["train_time_s"] > 0 and tf_row["latency_ms_p95"] >= tf_row["latency_ms_p50"] > 0
    assert tf_row["params"] == 706224 + 1280 * 3 + 3  # alpha-0.5 backbone + a 3-class head
    assert tf_row["input_size"] == 32 and tf_row["precision"] == "fp32"
    relative = pd.read_csv(out / "relative.csv").set_index("model")
    assert relative.loc[TF_MOBILENET, "relative_accuracy"] == 1.0
    assert set(relative["framework"]) == {"tensorflow", "pytorch"}
    for name in ("accuracy_vs_training_time.png", "accuracy_vs_inference_time.png"):
        assert (out / "plots" / name).stat().st_size > 10_000


def test_both_frameworks_are_measured_on_the_same_validation_images(mixed_run):
    out = mixed_run
    trials = {t["model"]: t["result"] for t in Store(out / "bakeoff.db").trials()}
    tf, pt = trials[TF_MOBILENET], trials["timm/test_resnet"]
    assert tf["n_val"] == pt["n_val"] == len(json.loads((out / "split.json").read_text())["val"])
    assert np.sum(tf["confusion_matrix"], axis=1).tolist() == np.sum(pt["confusion_matrix"], axis=1).tolist()
    assert len(tf["history"]) == 1 and tf["compile_time_s"] > 0
    assert tf["eval_time_s"] > 0 and tf["train_images_per_s"] > 0


def test_saved_keras_model_loads_back_with_its_preprocessing(mixed_run):
    from bakeoff.engines.keras.trial import load_saved

    out = mixed_run
    folder = out / "models" / TF_MOBILENET
    model, meta, classes = load_saved(folder)
    assert classes == ["blue", "green", "red"]
    assert meta["framework"] == "tensorflow" and meta["input_size"] == 32 and meta["input_layout"] == "NHWC"
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5] and meta["crop_pct"] == 0.875
    logits = keras_numpy(model(np.zeros((2, 32, 32, 3), np.float32), training=False))
    assert logits.shape == (2, 3) and np.isfinite(logits).all()
    with pytest.raises(BakeoffError, match="lacks model.keras"):
        load_saved(out / "models" / "timm__test_resnet")
