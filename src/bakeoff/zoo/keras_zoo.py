"""Keras models as ``keras/<Application>`` and the study's TensorFlow ids; specs without importing Keras.

Each Keras application expects its own input scaling (``keras.applications.*.preprocess_input``).
bakeoff expresses it as the spec's mean/std on [0, 1] pixels, so the shared batcher feeds every
framework the same images:

- ``tf``    x / 127.5 - 1                      -> mean 0.5, std 0.5
- ``torch`` x / 255, ImageNet mean/std          -> the ImageNet mean/std
- ``caffe`` RGB->BGR, minus the ImageNet mean   -> mean (123.68, 116.779, 103.939) / 255, std 1 / 255;
  the BGR order lives in the first convolution: its input channels are reordered when ImageNet
  weights load, so the model takes RGB like every other one
- ``raw``   the model rescales itself (EfficientNet, ConvNeXt, MobileNetV3) -> mean 0, std 1 / 255
"""

from __future__ import annotations

import os
from pathlib import Path

from bakeoff.zoo.spec import ModelSpec

__all__ = ["keras_names", "keras_spec", "KERAS_STUDY_IDS", "KERAS_APPLICATIONS", "PREPROCESSING",
           "keras_weights_cached", "BIT_ARCH", "preprocessing_mode", "study_spec"]

_GCS = "https://storage.googleapis.com/"

# name: (default input size, smallest input it builds at, preprocessing, ImageNet params with the
# 1000-class top, the no-top weights file Keras downloads, where it downloads it from; "*" = the file name).
# Read from keras 3.15 (sizes, params, files); tests check the names against keras.applications.
KERAS_APPLICATIONS: dict[str, tuple[int, int, str, int, str, str]] = {
    "ConvNeXtBase": (224, 32, "raw", 88591464, "convnext_base_notop.h5", "tensorflow/keras-applications/convnext/*"),
    "ConvNeXtLarge": (224, 32, "raw", 197767336, "convnext_large_notop.h5", "tensorflow/keras-applications/convnext/*"),
    "ConvNeXtSmall": (224, 32, "raw", 50223688, "convnext_small_notop.h5", "tensorflow/keras-applications/convnext/*"),
    "ConvNeXtTiny": (224, 32, "raw", 28589128, "convnext_tiny_notop.h5", "tensorflow/keras-applications/convnext/*"),
    "ConvNeXtXLarge": (224, 32, "raw", 350196968, "convnext_xlarge_notop.h5",
                       "tensorflow/keras-applications/convnext/*"),
    "DenseNet121": (224, 32, "torch", 8062504, "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "tensorflow/keras-applications/densenet/*"),
    "DenseNet169": (224, 32, "torch", 14307880, "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "tensorflow/keras-applications/densenet/*"),
    "DenseNet201": (224, 32, "torch", 20242984, "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "tensorflow/keras-applications/densenet/*"),
    "EfficientNetB0": (224, 32, "raw", 5330571, "efficientnetb0_notop.h5", "keras-applications/*"),
    "EfficientNetB1": (240, 32, "raw", 7856239, "efficientnetb1_notop.h5", "keras-applications/*"),
    "EfficientNetB2": (260, 32, "raw", 9177569, "efficientnetb2_notop.h5", "keras-applications/*"),
    "EfficientNetB3": (300, 32, "raw", 12320535, "efficientnetb3_notop.h5", "keras-applications/*"),
    "EfficientNetB4": (380, 32, "raw", 19466823, "efficientnetb4_notop.h5", "keras-applications/*"),
    "EfficientNetB5": (456, 32, "raw", 30562527, "efficientnetb5_notop.h5", "keras-applications/*"),
    "EfficientNetB6": (528, 32, "raw", 43265143, "efficientnetb6_notop.h5", "keras-applications/*"),
    "EfficientNetB7": (600, 32, "raw", 66658687, "efficientnetb7_notop.h5", "keras-applications/*"),
    "EfficientNetV2B0": (224, 32, "raw", 7200312, "efficientnetv2-b0_notop.h5",
                         "tensorflow/keras-applications/efficientnet_v2/*"),
    "EfficientNetV2B1": (240, 32, "raw", 8212124, "efficientnetv2-b1_notop.h5",
                         "tensorflow/keras-applications/efficientnet_v2/*"),
    "EfficientNetV2B2": (260, 32, "raw", 10178374, "efficientnetv2-b2_notop.h5",
                         "tensorflow/keras-applications/efficientnet_v2/*"),
    "EfficientNetV2B3": (300, 32, "raw", 14467622, "efficientnetv2-b3_notop.h5",
                         "tensorflow/keras-applications/efficientnet_v2/*"),
    "EfficientNetV2L": (480, 32, "raw", 119027848, "efficientnetv2-l_notop.h5",
                        "tensorflow/keras-applications/efficientnet_v2/*"),
    "EfficientNetV2M": (480, 32, "raw", 54431388, "efficientnetv2-m_notop.h5",
                        "tensorflow/keras-applications/efficientnet_v2/*"),
    "EfficientNetV2S": (384, 32, "raw", 21612360, "efficientnetv2-s_notop.h5",
                        "tensorflow/keras-applications/efficientnet_v2/*"),
    "InceptionResNetV2": (299, 75, "tf", 55873736, "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                          "tensorflow/keras-applications/inception_resnet_v2/*"),
    "InceptionV3": (299, 75, "tf", 23851784, "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "tensorflow/keras-applications/inception_v3/*"),
    "MobileNet": (224, 32, "tf", 4253864, "mobilenet_1_0_224_tf_no_top.h5", "tensorflow/keras-applications/mobilenet/*"),
    "MobileNetV2": (224, 32, "tf", 3538984, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
                    "tensorflow/keras-applications/mobilenet_v2/*"),
    "MobileNetV3Large": (224, 32, "raw", 5507432, "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
                         "tensorflow/keras-applications/mobilenet_v3/*"),
    "MobileNetV3Small": (224, 32, "raw", 2554968, "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
                         "tensorflow/keras-applications/mobilenet_v3/*"),
    "NASNetLarge": (331, 32, "tf", 88949818, "nasnet_large_no_top.h5",
                    "tensorflow/keras-applications/nasnet/NASNet-large-no-top.h5"),
    "NASNetMobile": (224, 32, "tf", 5326716, "nasnet_mobile_no_top.h5",
                     "tensorflow/keras-applications/nasnet/NASNet-mobile-no-top.h5"),
    "ResNet101": (224, 32, "caffe", 44707176, "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
                  "tensorflow/keras-applications/resnet/*"),
    "ResNet101V2": (224, 32, "tf", 44675560, "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "tensorflow/keras-applications/resnet/*"),
    "ResNet152": (224, 32, "caffe", 60419944, "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5",
                  "tensorflow/keras-applications/resnet/*"),
    "ResNet152V2": (224, 32, "tf", 60380648, "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "tensorflow/keras-applications/resnet/*"),
    "ResNet50": (224, 32, "caffe", 25636712, "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "tensorflow/keras-applications/resnet/*"),
    "ResNet50V2": (224, 32, "tf", 25613800, "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "tensorflow/keras-applications/resnet/*"),
    "VGG16": (224, 32, "caffe", 138357544, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "tensorflow/keras-applications/vgg16/*"),
    "VGG19": (224, 32, "caffe", 143667240, "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "tensorflow/keras-applications/vgg19/*"),
    "Xception": (299, 71, "tf", 22910480, "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "tensorflow/keras-applications/xception/*"),
}

# BiT-S R101x1 is in no Keras package: bakeoff builds it (engines/keras/bit.py) and loads Google's
# released checkpoint, whose pixels are scaled to [-1, 1] (the "tf" mode).
BIT_ARCH = "BiT-S-R101x1"
_BIT = (224, 32, "tf", 44541480, "BiT-S-R101x1.npz", "bit_models/*")

PREPROCESSING = {
    "tf": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "torch": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "caffe": ((123.68 / 255, 116.779 / 255, 103.939 / 255), (1 / 255, 1 / 255, 1 / 255)),
    "raw": ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)),
}

# The study's TensorFlow ids (the managed service's TF Hub models) -> a Keras build of the same network.
KERAS_STUDY_IDS: dict[str, tuple[str, dict]] = {
    "tensorflow-ic-imagenet-inception-v3-classification-4": ("InceptionV3", {}),
    "tensorflow-ic-imagenet-inception-resnet-v2-classification-4": ("InceptionResNetV2", {}),
    "tensorflow-ic-imagenet-mobilenet-v2-050-224-classification-4": ("MobileNetV2", {"alpha": 0.5}),
    "tensorflow-ic-imagenet-mobilenet-v2-075-224-classification-4": ("MobileNetV2", {"alpha": 0.75}),
    "tensorflow-ic-imagenet-mobilenet-v2-140-224-classification-4": ("MobileNetV2", {"alpha": 1.4}),
    "tensorflow-ic-tf2-preview-mobilenet-v2-classification-4": ("MobileNetV2", {}),
    "tensorflow-ic-imagenet-resnet-v2-152-classification-4": ("ResNet152V2", {}),
    "tensorflow-ic-bit-s-r101x1-ilsvrc2012-classification-1": (BIT_ARCH, {}),
}

# MobileNetV2 at other widths: its params and weights file differ from the alpha-1.0 row above.
_MOBILENET_V2_ALPHA = {0.5: 1987224, 0.75: 2663064, 1.4: 6156712}


def keras_names() -> tuple[str, ...]:
    """Every ``keras.applications`` model name (without importing Keras)."""
    return tuple(sorted(KERAS_APPLICATIONS))


def _row(architecture: str, kwargs: dict) -> tuple[int, int, str, int, str, str]:
    if architecture == BIT_ARCH:
        return _BIT
    size, min_size, mode, params, fname, where = KERAS_APPLICATIONS[architecture]
    alpha = kwargs.get("alpha")
    if architecture == "MobileNetV2" and alpha in _MOBILENET_V2_ALPHA:
        params, fname = _MOBILENET_V2_ALPHA[alpha], fname.replace("_1.0_", f"_{alpha}_")
    return size, min_size, mode, params, fname, where


def preprocessing_mode(architecture: str) -> str:
    """``tf``, ``torch``, ``caffe`` or ``raw`` (see the module docstring)."""
    return _row(architecture, {})[2]


def keras_spec(architecture: str, model_id: str | None = None, build_kwargs: dict | None = None,
               aliases: tuple[str, ...] = ()) -> ModelSpec:
    """The spec of a Keras application (or BiT) with ``build_kwargs`` for its constructor."""
    kwargs = dict(build_kwargs or {})
    size, min_size, mode, params, fname, where = _row(architecture, kwargs)
    mean, std = PREPROCESSING[mode]
    url = _GCS + (where.replace("*", fname) if where.endswith("*") else where)
    if architecture == BIT_ARCH:
        source = (f"{url} (Google Research big_transfer, Apache-2.0; network built in Keras by bakeoff: "
                  f"ResNetV2-101x1, group norm, weight standardisation)")
        license_ = "Apache-2.0 (BiT weights and reference code)"
    else:
        source = url + (" (BGR-trained: first conv reordered to take RGB)" if mode == "caffe" else "")
        license_ = "Apache-2.0 (Keras); weights: ImageNet terms"
    return ModelSpec(
        id=model_id or f"keras/{architecture}",
        framework="tensorflow",
        source="keras",
        architecture=architecture,
        input_size=size,
        min_input_size=min_size,
        crop_pct=0.875,
        mean=mean,
        std=std,
        interpolation="bilinear",
        classifier="classifier",
        license=license_,
        weight_source=source,
        weight_file=fname,
        params=params,
        build_kwargs=kwargs,
        aliases=aliases,
    )


def study_spec(model_id: str) -> ModelSpec:
    architecture, kwargs = KERAS_STUDY_IDS[model_id]
    return keras_spec(architecture, model_id, kwargs, aliases=(f"{model_id}-FT",))


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights (``$KERAS_HOME/models``, default ``~/.keras/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def keras_weights_cached(spec: ModelSpec) -> bool:
    """True when Keras already downloaded this model's ImageNet weights (they load with no network)."""
    return bool(spec.weight_file) and (keras_cache_dir() / spec.weight_file).is_file()
