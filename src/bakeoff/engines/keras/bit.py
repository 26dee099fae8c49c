"""BiT-S R101x1 in Keras 3: ResNetV2-101 (pre-activation) with group norm and weight-standardised
convolutions, as released by Google Research (big_transfer), and a loader for its ``.npz`` weights.

Import only after ``engines.keras.trial.import_keras()`` has chosen the backend.
"""

from __future__ import annotations

import numpy as np
import keras
from keras import layers, ops

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


def _layer_for(key: str) -> str | None:
    """The backbone layer for a checkpoint key (``resnet/block1/unit01/a/group_norm/gamma``); None for the head."""
    parts = key.removeprefix("resnet/").split("/")
    if parts[0] == "root_block":
        return "root_conv"
    if parts[0] == "group_norm":
        return "pre_head_gn"
    if parts[0] == "head":
        return None
    block, unit, branch, kind = parts[0], parts[1], parts[2], parts[3]
    if kind == "proj":
        return f"{block}_{unit}_{branch}_proj"
    return f"{block}_{unit}_{branch}_{'gn' if kind == 'group_norm' else 'conv'}"


def load_bit_npz(backbone: keras.Model, path) -> None:
    """Load Google's BiT checkpoint (``BiT-S-R101x1.npz``) into ``bit_backbone()``; every layer must be covered."""
    from bakeoff.errors import BakeoffError

    with np.load(path) as ckpt:
        found: dict[str, dict[str, np.ndarray]] = {}
        for key in ckpt.files:
            layer = _layer_for(key)
            if layer is not None:
                found.setdefault(layer, {})[key.rsplit("/", 1)[-1]] = ckpt[key]
    for layer in backbone.layers:
        if not layer.weights:
            continue
        got = found.pop(layer.name, None)
        if got is None:
            raise BakeoffError(f"{path} holds no weights for BiT layer {layer.name}: pass BiT-S-R101x1.npz")
        values = [got["gamma"], got["beta"]] if isinstance(layer, layers.GroupNormalization) else [got["kernel"]]
        if [tuple(v.shape) for v in values] != [tuple(w.shape) for w in layer.weights]:
            raise BakeoffError(f"{path} does not fit BiT-S R101x1 at {layer.name}: pass BiT-S-R101x1.npz")
        layer.set_weights(values)
    if found:
        raise BakeoffError(f"{path} has weights for layers BiT-S R101x1 lacks (first: {next(iter(found))})")
