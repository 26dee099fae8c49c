"""The predictor a server loads: one request image becomes the numbers of the run's evaluation
batches, and a saved Keras model answers like a PyTorch one."""

import json

import numpy as np
import pytest

from bakeoff.serve.predictor import Preprocess, load_predictor
from conftest import SERVED_COLOURS as COLOURS, SERVED_MODEL as MODEL, colour_image


def test_preprocess_matches_evaluation_batches(tmp_path):
    """One request image becomes the same numbers as the training run's evaluation batches."""
    import torch

    from bakeoff.data.batches import Batcher
    from bakeoff.data.cache import build_cache, cache_side
    from bakeoff.zoo.registry import resolve

    files = []
    for i, (fmt, size) in enumerate([("JPEG", (90, 61)), ("PNG", (33, 70)), ("JPEG", (300, 200))]):
        files.append(tmp_path / f"{i}.{fmt.lower()}")
        files[-1].write_bytes(colour_image((120, 80, 200), size, fmt, seed=i))
    for interpolation in ("bilinear", "bicubic"):
        meta = resolve(MODEL).to_dict() | {"input_size": 32, "interpolation": interpolation}
        pre = Preprocess.from_meta(meta)
        side = cache_side(32, meta["crop_pct"])
        cache = build_cache([str(f) for f in files], tmp_path / "cache", interpolation, side, interpolation)
        batcher = Batcher.create(cache.array(), np.arange(len(files)), 32, meta["mean"], meta["std"],
                                 torch.device("cpu"))
        expected = batcher.eval_batch(np.arange(len(files))).numpy()
        got = np.stack([pre(f.read_bytes()) for f in files])
        assert got.shape == (3, 3, 32, 32)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_keras_model_is_served_when_the_keras_engine_exists(tmp_path):
    """A saved Keras model (model.keras + the same spec.json / class map) answers like a PyTorch one."""
    engine = pytest.importorskip("bakeoff.engines.keras.trial")
    try:
        keras = engine.import_keras("cpu")
    except Exception as exc:  # the engine is there but no Keras backend is installed
        pytest.skip(f"Keras unavailable: {exc}")
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    folder = tmp_path / "out" / "models" / "keras__tiny"
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    meta = {"id": "keras/tiny", "framework": "tensorflow", "source": "keras", "architecture": "tiny",
            "input_size": 32, "crop_pct": 0.875, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
            "num_classes": 3, "output": "logits"}
    (folder / "spec.json").write_text(json.dumps(meta))
    (folder / "class_label_to_prediction_index.json").write_text(json.dumps({c: i for i, c in enumerate(COLOURS)}))
    predictor = load_predictor(tmp_path / "out", "keras/tiny", "cpu")
    assert predictor.framework == "tensorflow" and predictor.classes == list(COLOURS)
    batch = np.stack([predictor.preprocess(colour_image(rgb)) for rgb in COLOURS.values()])
    probs = predictor.predict(batch)
    logits = np.asarray(model.predict_on_batch(batch.transpose(0, 2, 3, 1)))
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
