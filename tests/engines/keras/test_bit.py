"""The Keras engine: Keras and PyTorch models in one comparison, the study's TensorFlow ids,
weights (download errors, local files, BiT's checkpoint), saving and loading."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from bakeoff.api import models, run_comparison
from bakeoff.errors import BakeoffError
from bakeoff.protocol import apply_preset
from bakeoff.zoo import list_specs, resolve
from bakeoff.zoo.keras_zoo import KERAS_STUDY_IDS, keras_names
from conftest import TINY

if importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow") is None:
    pytest.skip("needs bakeoff[tensorflow]", allow_module_level=True)

TF_MOBILENET = "tensorflow-ic-imagenet-mobilenet-v2-050-224-classification-4"


@pytest.fixture(scope="module")
def keras():
    from bakeoff.engines.keras.trial import import_keras

    return import_keras("cpu")


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, shared_colour_folder):
    out = tmp_path_factory.mktemp("keras-run") / "out"
    comparison = run_comparison(shared_colour_folder, [TF_MOBILENET, "timm/test_resnet"], out=out,
                                baseline=TF_MOBILENET, **(TINY | {"epochs": 1}))
    return out, comparison


def test_keras_and_pytorch_models_train_in_one_comparison(mixed_run):
    out, comparison = mixed_run
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
    out, comparison = mixed_run
    trials = {t["model"]: t["result"] for t in comparison_trials(out)}
    tf, pt = trials[TF_MOBILENET], trials["timm/test_resnet"]
    assert tf["n_val"] == pt["n_val"] == len(json.loads((out / "split.json").read_text())["val"])
    assert np.sum(tf["confusion_matrix"], axis=1).tolist() == np.sum(pt["confusion_matrix"], axis=1).tolist()
    assert len(tf["history"]) == 1 and tf["compile_time_s"] > 0
    assert tf["eval_time_s"] > 0 and tf["train_images_per_s"] > 0


def keras_numpy(x) -> np.ndarray:
    import keras

    return keras.ops.convert_to_numpy(x)


def comparison_trials(out):
    from bakeoff.store import Store

    return Store(out / "bakeoff.db").trials()


def test_saved_keras_model_loads_back_with_its_preprocessing(mixed_run):
    from bakeoff.engines.keras.trial import load_saved

    out, _ = mixed_run
    folder = out / "models" / TF_MOBILENET
    model, meta, classes = load_saved(folder)
    assert classes == ["blue", "green", "red"]
    assert meta["framework"] == "tensorflow" and meta["input_size"] == 32 and meta["input_layout"] == "NHWC"
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5] and meta["crop_pct"] == 0.875
    logits = keras_numpy(model(np.zeros((2, 32, 32, 3), np.float32), training=False))
    assert logits.shape == (2, 3) and np.isfinite(logits).all()
    with pytest.raises(BakeoffError, match="lacks model.keras"):
        load_saved(out / "models" / "timm__test_resnet")


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


def test_jumpstart_preset_has_the_study_s_15_models_and_baseline():
    preset = apply_preset("jumpstart-blog")
    specs = [resolve(m) for m in preset.models]
    assert len(specs) == 15 and sum(s.framework == "tensorflow" for s in specs) == 8
    assert resolve(preset.baseline).architecture == "InceptionV3" and preset.baseline in preset.models


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


BIT_ID = "tensorflow-ic-bit-s-r101x1-ilsvrc2012-classification-1"
R101_UNITS = (3, 4, 23, 3)


def _bit_checkpoint(units=R101_UNITS) -> dict[str, np.ndarray]:
    """A file in the layout of Google's released BiT-S .npz checkpoints (google-research/big_transfer,
    read by its bit_pytorch/bit_jax loaders): HWIO kernels, 1-D group-norm gamma and beta, a
    projection in each block's first unit only, the 1000-class head; random float32 values."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    ckpt = {"resnet/root_block/standardized_conv2d/kernel": normal(7, 7, 3, 64),
            "resnet/group_norm/gamma": 1 + 0.1 * normal(2048), "resnet/group_norm/beta": 0.1 * normal(2048),
            "resnet/head/conv2d/kernel": normal(1, 1, 2048, 1000), "resnet/head/conv2d/bias": normal(1000)}
    cin = 64
    for b, n in enumerate(units):
        mid = 64 * 2 ** b
        for u in range(1, n + 1):
            p = f"resnet/block{b + 1}/unit{u:02d}/"
            for branch, shape in (("a", (1, 1, cin, mid)), ("b", (3, 3, mid, mid)), ("c", (1, 1, mid, mid * 4))):
                ckpt[p + f"{branch}/standardized_conv2d/kernel"] = normal(*shape)
                ckpt[p + f"{branch}/group_norm/gamma"] = 1 + 0.1 * normal(shape[2])
                ckpt[p + f"{branch}/group_norm/beta"] = 0.1 * normal(shape[2])
            if u == 1:
                ckpt[p + "a/proj/standardized_conv2d/kernel"] = normal(1, 1, cin, mid * 4)
            cin = mid * 4
    return ckpt


def _bit_reference(ckpt: dict, images: np.ndarray, units=R101_UNITS) -> np.ndarray:
    """BiT's pooled features computed from the file's keys, written after the published PyTorch
    model (pre-activation units, weight-standardised convolutions, zero padding before the max
    pool): an independent check that each key lands where the network uses it."""
    import torch
    import torch.nn.functional as F

    w = lambda key: torch.from_numpy(ckpt[key])  # noqa: E731

    def conv(x, key, stride=1, padding=0):
        k = w(key).permute(3, 2, 0, 1)  # HWIO -> OIHW
        var, mean = torch.var_mean(k, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (k - mean) / torch.sqrt(var + 1e-10), stride=stride, padding=padding)

    def gn_relu(x, prefix):
        return F.relu(F.group_norm(x, 32, w(prefix + "gamma"), w(prefix + "beta"), eps=1e-5))

    with torch.no_grad():
        x = conv(torch.from_numpy(images).permute(0, 3, 1, 2), "resnet/root_block/standardized_conv2d/kernel", 2, 3)
        x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)
        for b, n in enumerate(units):
            for u in range(1, n + 1):
                p, stride = f"resnet/block{b + 1}/unit{u:02d}/", 2 if b > 0 and u == 1 else 1
                out = gn_relu(x, p + "a/group_norm/")
                shortcut = conv(out, p + "a/proj/standardized_conv2d/kernel", stride) if u == 1 else x
                out = conv(out, p + "a/standardized_conv2d/kernel")
                out = conv(gn_relu(out, p + "b/group_norm/"), p + "b/standardized_conv2d/kernel", stride, 1)
                x = conv(gn_relu(out, p + "c/group_norm/"), p + "c/standardized_conv2d/kernel") + shortcut
        return gn_relu(x, "resnet/group_norm/").mean(dim=(2, 3)).numpy()


@pytest.fixture(scope="module")
def bit_from_weights_dir(keras, tmp_path_factory):
    """A BiT-S R101x1 file in --weights-dir, and the model a run builds from it."""
    from bakeoff.engines.keras.build import build_model
    from bakeoff.zoo.registry import check_weights_reachable

    folder = tmp_path_factory.mktemp("weights")
    ckpt = _bit_checkpoint()
    np.savez(folder / "BiT-S-R101x1.npz", **ckpt)
    spec = resolve(BIT_ID)
    check_weights_reachable([spec], folder)  # the run's check before training: found, no network needed
    _, backbone, weights, _ = build_model(keras, spec, 3, 32, pretrained=True, weights_dir=folder)
    return ckpt, backbone, weights


def test_bit_weights_dir_file_in_google_s_layout_loads_every_value_where_it_belongs(bit_from_weights_dir):
    ckpt, backbone, weights = bit_from_weights_dir
    assert weights == "imagenet (file BiT-S-R101x1.npz)"
    # every weight of the model is one of the file's arrays, and every array but the head is used once
    by_value = {v.tobytes(): k for k, v in ckpt.items()}
    used = [by_value.get(keras_numpy(v).astype(np.float32).tobytes()) for v in backbone.weights]
    assert None not in used and len(set(used)) == len(used) == len(ckpt) - 2
    assert set(ckpt) - set(used) == {"resnet/head/conv2d/kernel", "resnet/head/conv2d/bias"}
    # ... and each sits where the published network uses it
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    got, want = keras_numpy(backbone(images, training=False)), _bit_reference(ckpt, images)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("resnet/block3/unit17/b/group_norm/gamma"), "lacks resnet/block3/unit17/b/group_norm/gamma"),
    (lambda c: c.update({"resnet/block4/unit02/c/standardized_conv2d/kernel": np.zeros((1, 1, 512, 1024))}),
     r"resnet/block4/unit02/c/standardized_conv2d/kernel has shape \(1, 1, 512, 1024\) where BiT-S R101x1 needs "
     r"\(1, 1, 512, 2048\)"),
    (lambda c: c.update({"resnet/block3/unit24/a/group_norm/gamma": np.ones(1024)}),
     "holds keys BiT-S R101x1 lacks .1, first resnet/block3/unit24/a/group_norm/gamma"),
])
def test_bit_file_with_a_missing_misshapen_or_extra_key_gives_one_line_and_loads_nothing(
        bit_from_weights_dir, tmp_path, change, message):
    from bakeoff.engines.keras.bit import load_bit_npz

    ckpt, backbone, _ = bit_from_weights_dir
    bad = {k: v + 1 for k, v in ckpt.items()}  # other values: a partial load would show
    change(bad)
    np.savez(tmp_path / "BiT-S-R101x1.npz", **bad)
    with pytest.raises(BakeoffError, match=message) as err:
        load_bit_npz(backbone, tmp_path / "BiT-S-R101x1.npz")
    assert "\n" not in str(err.value) and "pass BiT-S-R101x1.npz" in str(err.value)
    np.testing.assert_array_equal(keras_numpy(backbone.weights[0]), ckpt["resnet/root_block/standardized_conv2d/kernel"])


def test_bit_file_that_is_no_npz_gives_one_line(keras, tmp_path):
    from bakeoff.engines.keras.bit import bit_backbone, load_bit_npz

    backbone = bit_backbone((32, 32, 3), units=(1, 1, 1, 1))
    (tmp_path / "BiT-S-R101x1.npz").write_text("<html>not found</html>")
    np.save(tmp_path / "one.npy", np.zeros(3))
    for path, why in ((tmp_path / "BiT-S-R101x1.npz", "is not a BiT .npz checkpoint"),
                      (tmp_path / "one.npy", "holds one array")):
        with pytest.raises(BakeoffError, match=why) as err:
            load_bit_npz(backbone, path)
        assert "\n" not in str(err.value)


def test_std_conv_standardises_its_kernel(keras):
    from bakeoff.engines.keras.bit import StdConv2D

    conv = StdConv2D(4, 3, use_bias=False)
    x = np.random.default_rng(1).random((1, 8, 8, 3), dtype=np.float32)
    y1 = keras.ops.convert_to_numpy(conv(x))
    conv.kernel.assign(keras.ops.convert_to_numpy(conv.kernel) * 3.0 + 0.5)  # standardisation undoes scale and shift
    np.testing.assert_allclose(keras.ops.convert_to_numpy(conv(x)), y1, rtol=1e-4, atol=1e-4)


def test_random_init_batch_norm_statistics_move_at_pytorchs_rate(keras):
    """From random weights a Keras model's running statistics follow the batches as a PyTorch
    model's do (10% a step), so a few hundred steps leave them where the data is."""
    from bakeoff.engines.keras.build import build_model, torch_rate_batch_norm
    from bakeoff.engines.keras.fit import Steps, make_optimizer
    from bakeoff.protocol import Protocol
    from bakeoff.zoo import resolve

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
