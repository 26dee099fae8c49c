"""Building a Keras model: every study TensorFlow id builds with its ImageNet parameter count,
the head starts at zero (first loss ln(classes)), weights come from the network or a file in
--weights-dir (Caffe-style models turned to RGB), batch norm moves at PyTorch's rate."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from bakeoff.errors import BakeoffError
from bakeoff.protocol import Protocol
from bakeoff.zoo import resolve
from bakeoff.zoo.keras_zoo import KERAS_STUDY_IDS
from conftest import TF_MOBILENET, keras_numpy

if importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow") is None:
    pytest.skip("needs bakeoff[tensorflow]", allow_module_level=True)


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="needs bakeoff[tensorflow]")
def test_keras_head_starts_at_zero_and_the_first_loss_is_ln_classes():
    from bakeoff.engines.keras.build import build_model as build_keras
    from bakeoff.engines.keras.trial import import_keras
    from bakeoff.engines.keras.fit import Steps, make_optimizer

    keras = import_keras("cpu")
    spec = resolve("tensorflow-ic-imagenet-mobilenet-v2-050-224-classification-4")
    model, _, _, _ = build_keras(keras, spec, 6, 32, pretrained=False)
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.get_layer("classifier").weights)
    assert kernel.shape == (1280, 6) and not kernel.any() and not bias.any()
    steps = Steps(keras, model, make_optimizer(keras, Protocol()))
    rng = np.random.default_rng(0)
    loss, _ = steps.train(rng.normal(size=(6, 32, 32, 3)).astype(np.float32), rng.integers(0, 6, 6).astype(np.int32))
    assert float(loss) == pytest.approx(math.log(6), abs=1e-5)


def test_every_study_tensorflow_id_builds_and_predicts_its_classes(keras):
    from bakeoff.engines.keras.build import build_model

    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    for mid in KERAS_STUDY_IDS:
        spec = resolve(mid + "-FT")
        assert spec.id == mid and spec.framework == "tensorflow" and spec.source == "keras"
        model, backbone, weights, upsampled = build_model(keras, spec, 5, 32, pretrained=False)
        out = keras.ops.convert_to_numpy(model(x, training=False))
        assert out.shape == (2, 5) and np.isfinite(out).all() and weights == "random-init"
        features = backbone.output_shape[-1]
        assert backbone.count_params() + features * 1000 + 1000 == spec.params, mid  # the zoo's ImageNet count
        assert upsampled == (75 if spec.architecture.startswith("Inception") else None)
        keras.backend.clear_session()


def test_no_network_gives_the_weights_dir_fix(keras, monkeypatch):
    from keras.src.utils import file_utils

    from bakeoff.engines.keras.build import build_model

    def offline(fname=None, origin=None, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    spec = resolve(TF_MOBILENET)
    with pytest.raises(BakeoffError) as err:
        build_model(keras, spec, 3, 32, pretrained=True)
    message = str(err.value)
    assert "could not fetch ImageNet weights" in message and "--weights-dir DIR" in message
    assert "--no-pretrained" in message and spec.weight_file in message
    model, _, weights, _ = build_model(keras, spec, 3, 32, pretrained="offline")
    assert weights == "random-init"


def test_weights_dir_file_loads_and_caffe_models_take_rgb(keras, tmp_path):
    from bakeoff.engines.keras.build import build_model

    spec = resolve("keras/VGG16")
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    source.save_weights(tmp_path / "VGG16.weights.h5")
    _, backbone, weights, _ = build_model(keras, spec, 4, 32, pretrained=True, weights_dir=tmp_path)
    assert weights == "imagenet (file VGG16.weights.h5)"
    assert len(source.layers) == len(backbone.layers)
    for layer, twin in zip(source.layers, backbone.layers):
        for want, got in zip(layer.weights, twin.weights, strict=True):
            want, got = keras_numpy(want), keras_numpy(got)
            if layer.name == "block1_conv1" and want.ndim == 4:
                want = want[:, :, ::-1, :]  # BGR-trained weights now read RGB
            np.testing.assert_array_equal(got, want)
    (tmp_path / "VGG16.weights.h5").unlink()
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3),
                                   alpha=0.5).save_weights(tmp_path / "VGG16.weights.h5")
    with pytest.raises(BakeoffError, match="do not fit keras/VGG16"):
        build_model(keras, spec, 4, 32, pretrained=True, weights_dir=tmp_path)


def test_random_init_batch_norm_statistics_move_at_pytorchs_rate(keras):
    """From random weights a Keras model's running statistics follow the batches as a PyTorch
    model's do (10% a step), so a few hundred steps leave them where the data is."""
    from bakeoff.engines.keras.build import build_model, torch_rate_batch_norm
    from bakeoff.engines.keras.fit import Steps, make_optimizer

    model, _, weights, _ = build_model(keras, resolve("keras/MobileNetV2"), 3, 32, pretrained=False)
    norms = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    assert weights == "random-init" and len(norms) == 52 and {l.momentum for l in norms} == {0.9}

    keras.utils.set_random_seed(0)
    tiny = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.BatchNormalization(),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    assert torch_rate_batch_norm(keras, tiny) == 1
    steps = Steps(keras, tiny, make_optimizer(keras, Protocol(pretrained=False)))
    x = np.broadcast_to(np.float32([1.0, 2.0, -3.0]), (8, 4, 4, 3)).copy()  # each channel's mean known
    for _ in range(5):
        steps.train(x, np.zeros(8, np.int32))
    steps.finish()
    moved = keras.ops.convert_to_numpy(tiny.layers[0].moving_mean)
    # PyTorch's rule by hand: mean_k = (1 - 0.9^k) * batch mean, from 0
    np.testing.assert_allclose(moved, (1 - 0.9 ** 5) * np.float32([1.0, 2.0, -3.0]), rtol=1e-5)
