"""BiT-S R101x1 in Keras 3: ResNetV2-101 (pre-activation) with group norm and weight-standardised
convolutions, as released by Google Research (big_transfer), and a loader for its ``.npz`` weights.

Import only after ``engines.keras.trial.import_keras()`` has chosen the backend.
"""

from __future__ import annotations

import zipfile

import numpy as np
import keras
from keras import layers, ops

from bakeoff.errors import BakeoffError

__all__ = ["StdConv2D", "bit_backbone", "load_bit_npz", "BIT_URL"]

BIT_URL = "https://storage.googleapis.com/bit_models/BiT-S-R101x1.npz"
R101_UNITS = (3, 4, 23, 3)


@keras.saving.register_keras_serializable(package="bakeoff")
class StdConv2D(layers.Conv2D):
    """Conv2D whose kernel is standardised (zero mean, unit variance per output filter) at each call."""

    def convolution_op(self, inputs, kernel):
        k = ops.cast(kernel, "float32")
        mean = ops.mean(k, axis=(0, 1, 2), keepdims=True)
        var = ops.var(k, axis=(0, 1, 2), keepdims=True)
        k = ops.cast((k - mean) / ops.sqrt(var + 1e-10), inputs.dtype)
        return super().convolution_op(inputs, k)


def _gn_relu(x, name: str):
    return layers.ReLU(name=f"{name}_relu")(layers.GroupNormalization(groups=32, epsilon=1e-5, name=name)(x))


def _unit(x, cin: int, cout: int, cmid: int, stride: int, name: str):
    """Pre-activation bottleneck with the stride on the 3x3 convolution (BiT's layout)."""
    pre = _gn_relu(x, f"{name}_a_gn")
    shortcut = x
    if stride != 1 or cin != cout:
        shortcut = StdConv2D(cout, 1, strides=stride, use_bias=False, name=f"{name}_a_proj")(pre)
    y = StdConv2D(cmid, 1, use_bias=False, name=f"{name}_a_conv")(pre)
    y = _gn_relu(y, f"{name}_b_gn")
    y = layers.ZeroPadding2D(1, name=f"{name}_b_pad")(y)  # symmetric padding, as the released weights expect
    y = StdConv2D(cmid, 3, strides=stride, use_bias=False, name=f"{name}_b_conv")(y)
    y = _gn_relu(y, f"{name}_c_gn")
    y = StdConv2D(cout, 1, use_bias=False, name=f"{name}_c_conv")(y)
    return layers.Add(name=f"{name}_add")([y, shortcut])


def bit_backbone(input_shape, units=R101_UNITS, width: int = 1, name: str = "bit_s_r101x1") -> keras.Model:
    """Image -> pooled 2048*width features (no classifier)."""
    inputs = keras.Input(input_shape)
    x = layers.ZeroPadding2D(3, name="root_pad")(inputs)
    x = StdConv2D(64 * width, 7, strides=2, use_bias=False, name="root_conv")(x)
    x = layers.ZeroPadding2D(1, name="root_pool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="root_pool")(x)
    cin = 64 * width
    for b, n in enumerate(units):
        cmid = 64 * width * 2 ** b
        for u in range(n):
            stride = 2 if b > 0 and u == 0 else 1
            x = _unit(x, cin, cmid * 4, cmid, stride, f"block{b + 1}_unit{u + 1:02d}")
            cin = cmid * 4
    x = _gn_relu(x, "pre_head_gn")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=name)


def _checkpoint_key(layer_name: str, weight_name: str) -> str:
    """The key of Google's checkpoint that holds one weight of a ``bit_backbone()`` layer:
    ``block1_unit01_a_gn`` / ``gamma`` -> ``resnet/block1/unit01/a/group_norm/gamma``."""
    if layer_name == "root_conv":
        return f"resnet/root_block/standardized_conv2d/{weight_name}"
    if layer_name == "pre_head_gn":
        return f"resnet/group_norm/{weight_name}"
    block, unit, branch, kind = layer_name.split("_")
    where = {"gn": "group_norm", "conv": "standardized_conv2d", "proj": "proj/standardized_conv2d"}[kind]
    return f"resnet/{block}/{unit}/{branch}/{where}/{weight_name}"


def _open_npz(path):
    try:
        ckpt = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BakeoffError(f"{path} is not a BiT .npz checkpoint ({why}): pass BiT-S-R101x1.npz "
                           f"from {BIT_URL}") from None
    if not isinstance(ckpt, np.lib.npyio.NpzFile):
        raise BakeoffError(f"{path} holds one array, not a BiT .npz checkpoint: pass BiT-S-R101x1.npz from {BIT_URL}")
    return ckpt


def load_bit_npz(backbone: keras.Model, path) -> None:
    """Load Google's BiT checkpoint (``BiT-S-R101x1.npz``) into ``bit_backbone()``.

    Every backbone weight must be in the file at its shape, and every file key but the
    classifier (``resnet/head/...``) must be used; the file is checked whole before any
    weight is set, so a bad file leaves the model as it was and names the first bad key."""
    fix = f"pass BiT-S-R101x1.npz from {BIT_URL}"
    with _open_npz(path) as ckpt:
        unused = {k for k in ckpt.files if not k.startswith("resnet/head/")}
        plan = []
        for layer in backbone.layers:
            values = []
            for weight in layer.weights:
                key = _checkpoint_key(layer.name, weight.name)
                if key not in unused:
                    raise BakeoffError(f"{path} lacks {key}, a weight of BiT-S R101x1: {fix}")
                unused.discard(key)
                value = ckpt[key]
                if tuple(value.shape) != tuple(weight.shape):
                    raise BakeoffError(f"{path}: {key} has shape {tuple(value.shape)} where BiT-S R101x1 needs "
                                       f"{tuple(weight.shape)}: {fix}")
                values.append(value)
            if values:
                plan.append((layer, values))
    if unused:
        raise BakeoffError(f"{path} holds keys BiT-S R101x1 lacks ({len(unused)}, first {min(unused)}; "
                           f"another BiT depth or width?): {fix}")
    for layer, values in plan:
        layer.set_weights(values)
