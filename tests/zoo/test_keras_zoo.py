"""The Keras zoo: every Keras application and the study's TensorFlow ids, listed without
importing Keras, with their preprocessing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from bakeoff.api import models
from bakeoff.zoo import list_specs, resolve
from bakeoff.zoo.keras_zoo import KERAS_STUDY_IDS, keras_names

if importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow") is None:
    pytest.skip("needs bakeoff[tensorflow]", allow_module_level=True)


def test_keras_zoo_lists_every_application_without_importing_keras(keras):
    assert set(keras_names()) == {n for n in dir(keras.applications) if n[0].isupper()}
    code = ("import sys; from bakeoff.zoo import keras_zoo as z; "
            "specs = [z.keras_spec(n) for n in z.keras_names()] + [z.study_spec(m) for m in z.KERAS_STUDY_IDS]; "
            "print(len(specs), 'keras' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(len(KERAS_STUDY_IDS) + len(keras_names())), "False", "False"]
    df = models(framework="tensorflow")
    assert len(df) == int(out[0]) and df["params"].notna().all() and (df["framework"] == "tensorflow").all()
    spec = resolve("keras/ResNet50")
    assert spec.mean[0] == pytest.approx(123.68 / 255) and spec.std[0] == pytest.approx(1 / 255)
    assert "first conv reordered" in spec.weight_source
    assert resolve("keras/EfficientNetB3").input_size == 300 and resolve("keras/EfficientNetB3").mean == (0, 0, 0)
    assert {s.id for s in list_specs("mobilenet-v2", "tensorflow")} == {m for m in KERAS_STUDY_IDS if "mobilenet" in m}
