"""Parameter counts in the model listing: the zoo's figures by default (no network built, Keras not
imported), or, with count_params / --count-params, counted by each model's own engine."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torchvision
from typer.testing import CliRunner

from bakeoff.api import models
from bakeoff.cli import app
from conftest import TF_MOBILENET

needs_keras = pytest.mark.skipif(importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow") is None,
                                 reason="needs bakeoff[tensorflow]")


def test_listing_builds_no_keras_network_unless_asked():
    code = (f"import sys; from bakeoff.api import models; df = models({TF_MOBILENET!r}); "
            "print(int(df['params'][0]), 'keras' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"] and int(out[0]) > 0


def keras_count(keras, alpha: float) -> int:
    """Keras's own count of its ImageNet MobileNetV2 (1000-class top), built without weights."""
    return keras.applications.MobileNetV2(alpha=alpha, weights=None, include_top=True, classes=1000).count_params()


@needs_keras
def test_a_keras_model_is_counted_as_keras_counts_it(keras):
    df = models(TF_MOBILENET, count_params=True)
    assert df["id"].tolist() == [TF_MOBILENET] and df["params"].tolist() == [keras_count(keras, 0.5)]


@needs_keras
def test_the_keras_engine_counts_the_network_it_builds_not_the_zoo_s_figure(keras):
    from bakeoff.engines.keras import count_params
    from bakeoff.zoo.keras_zoo import keras_spec

    spec = keras_spec("MobileNetV2", build_kwargs={"alpha": 0.35})  # a width the zoo has no figure of
    assert count_params(spec) == keras_count(keras, 0.35) != spec.params


def test_a_pytorch_model_is_counted_as_torchvision_builds_it():
    want = sum(p.numel() for p in torchvision.models.googlenet(weights=None, aux_logits=False,
                                                               init_weights=False).parameters())
    df = models("pytorch-ic-googlenet", count_params=True)
    assert df["params"].tolist() == [want]


@needs_keras
def test_the_command_line_counts_on_request(keras):
    result = CliRunner().invoke(app, ["models", "mobilenet-v2-050", "--count-params", "--format", "csv"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    counted = {r[0]: int(r[header.index("params")]) for r in rows}
    assert counted == {TF_MOBILENET: keras_count(keras, 0.5)}
