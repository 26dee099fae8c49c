"""BiT-S R101x1 from a file in --weights-dir: Google's released checkpoint layout loads every
value where the published network uses it, and a damaged file is one line that loads nothing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from bakeoff.errors import BakeoffError
from bakeoff.zoo import resolve
from conftest import keras_numpy

if importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow") is None:
    pytest.skip("needs bakeoff[tensorflow]", allow_module_level=True)

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
