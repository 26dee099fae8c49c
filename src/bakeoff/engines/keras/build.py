"""Build a Keras model from its spec: backbone (keras.applications or BiT) + a new classifier,
ImageNet weights from Keras's download, a local file (--weights-dir) or none."""

from __future__ import annotations

import urllib.error

import numpy as np

from bakeoff.errors import BakeoffError
from bakeoff.zoo.keras_zoo import BIT_ARCH, KERAS_APPLICATIONS, preprocessing_mode
from bakeoff.zoo.registry import find_weights_file, weights_available_offline
from bakeoff.zoo.spec import ModelSpec

__all__ = ["build_model", "count_params", "torch_rate_batch_norm", "TORCH_BN_MOMENTUM"]


def _is_network_error(exc: Exception) -> bool:
    # keras.utils.get_file wraps URLError/HTTPError in a plain Exception("URL fetch failure on ...")
    return isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)) or "URL fetch failure" in str(exc)


def _network_error(spec: ModelSpec, exc: Exception) -> BakeoffError:
    from bakeoff.engines.torch.build import no_network_error  # one wording for every framework

    return no_network_error(spec, exc)


def _bgr_first_conv(keras, backbone) -> None:
    """Caffe-style weights were trained on BGR: reorder the first convolution's input channels so
    the model takes RGB, like every other model in a run."""
    conv = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D))
    kernel = keras.ops.convert_to_numpy(conv.kernel)
    conv.kernel.assign(np.ascontiguousarray(kernel[:, :, ::-1, :]))


def _application(keras, spec: ModelSpec, size: int, weights):
    ctor = getattr(keras.applications, spec.architecture)
    return ctor(include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg", **spec.build_kwargs)


def _backbone(keras, spec: ModelSpec, size: int, pretrained, weights_dir):
    """(backbone, description of its starting weights)."""
    if pretrained == "offline" and not weights_available_offline(spec, weights_dir):
        pretrained = False
    if spec.architecture == BIT_ARCH:
        from bakeoff.engines.keras.bit import BIT_URL, bit_backbone, load_bit_npz

        backbone = bit_backbone((size, size, 3))
        if not pretrained:
            return backbone, "random-init"
        local = find_weights_file(spec, weights_dir)
        try:
            path = local or keras.utils.get_file(spec.weight_file, BIT_URL, cache_subdir="models")
        except Exception as exc:
            if _is_network_error(exc):
                raise _network_error(spec, exc) from None
            raise
        load_bit_npz(backbone, path)
        return backbone, f"imagenet (file {local.name})" if local else f"imagenet ({BIT_URL})"
    if spec.architecture not in KERAS_APPLICATIONS:
        raise BakeoffError(f"{spec.id}: keras.applications has no {spec.architecture}")
    if not pretrained:
        return _application(keras, spec, size, None), "random-init"
    local = find_weights_file(spec, weights_dir)
    if local is not None:
        backbone = _application(keras, spec, size, None)
        try:
            backbone.load_weights(str(local))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise BakeoffError(f"weights {local} do not fit {spec.id} ({first}): pass Keras's no-top file "
                               f"{spec.weight_file} or use --no-pretrained") from None
        desc = f"imagenet (file {local.name})"
    else:
        try:
            backbone = _application(keras, spec, size, "imagenet")
        except Exception as exc:
            if _is_network_error(exc):
                raise _network_error(spec, exc) from None
            raise
        desc = f"imagenet ({spec.weight_source.split(' ')[0]})"
    if preprocessing_mode(spec.architecture) == "caffe":
        _bgr_first_conv(keras, backbone)
    return backbone, desc


# Keras's running-statistics momentum in PyTorch's terms: each training step moves a batch-norm
# layer's running mean and variance 10% of the way to the batch's (PyTorch's momentum 0.1).
TORCH_BN_MOMENTUM = 0.9


def torch_rate_batch_norm(keras, model) -> int:
    """Set every batch-norm layer of ``model`` to PyTorch's update rate; returns how many.

    Keras applications keep 0.99-0.999: from random weights, a few hundred steps leave their
    running statistics near their starting values, so the model evaluates at chance while it
    trains well, where a PyTorch model of the same steps does not. Under random init every
    framework therefore updates at PyTorch's rate; pretrained models keep their own, which
    start where their statistics should be."""
    layers = [layer for layer in model._flatten_layers(include_self=False)
              if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.momentum = TORCH_BN_MOMENTUM
    return len(layers)


def build_model(keras, spec: ModelSpec, num_classes: int, input_size: int, pretrained=True, weights_dir=None):
    """Return (model, its backbone, starting weights, side the input is upsampled to or None).

    The model takes ``input_size`` NHWC images normalised with the spec's mean/std and returns
    logits from a new float32 ``classifier`` layer that starts at zero. A network that cannot run
    at ``input_size`` (e.g. InceptionV3 below 75 px, only with --image-size) gets an in-model
    bilinear upsampling to its minimum (``spec.min_input_size``), as in the PyTorch engine
    (``engines.torch.build.upsample_to_minimum``).
    """
    build_size = max(input_size, spec.min_input_size or input_size)
    backbone, weights = _backbone(keras, spec, build_size, pretrained, weights_dir)
    if weights == "random-init":
        torch_rate_batch_norm(keras, backbone)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = inputs
    if build_size != input_size:
        x = keras.layers.Resizing(build_size, build_size, interpolation="bilinear", name="upsample")(x)
    x = backbone(x)
    # Zero weights and bias, like every engine's new head (engines.torch.build.zero_heads): uniform
    # predictions at the start, not Keras's Glorot draw.
    outputs = keras.layers.Dense(num_classes, dtype="float32", name="classifier",
                                 kernel_initializer="zeros", bias_initializer="zeros")(x)
    model = keras.Model(inputs, outputs, name="bakeoff_model")
    return model, backbone, weights, (build_size if build_size != input_size else None)


def count_params(spec: ModelSpec, num_classes: int = 1000) -> int:
    """Parameters of the network a trial builds, with a ``num_classes`` head: built without weights
    on the CPU (Keras has no shapes-only build, so this takes seconds for a large network)."""
    from bakeoff.engines.keras.trial import import_keras

    keras = import_keras("cpu")
    model = build_model(keras, spec, num_classes, spec.input_size, pretrained=False)[0]
    return int(model.count_params())
