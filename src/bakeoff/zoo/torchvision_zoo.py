"""Every torchvision classifier as ``torchvision/<name>``, specs read from its weights' metadata."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from bakeoff.zoo.spec import ModelSpec

__all__ = ["torchvision_names", "torchvision_spec", "torchvision_create", "torchvision_weights_offline",
           "in_torch_hub", "CLASSIFIER_ATTR", "MIN_INPUT_SIZE"]

# The layer each family ends in; the engine also finds it by shape when a family is missing.
CLASSIFIER_ATTR = {
    "alexnet": "classifier.6", "vgg": "classifier.6", "densenet": "classifier", "resnet": "fc",
    "resnext": "fc", "wide_resnet": "fc", "regnet": "fc", "googlenet": "fc", "inception": "fc",
    "shufflenet": "fc", "mobilenet_v2": "classifier.1", "mobilenet_v3": "classifier.3",
    "mnasnet": "classifier.1", "efficientnet": "classifier.1", "convnext": "classifier.2",
    "squeezenet": "classifier.1", "vit": "heads.head", "swin": "head", "maxvit": "classifier.5",
}

# The smallest side each family runs at, where it is above the smallest --image-size (fixed pooling
# or unpadded convolutions: alexnet's 6 x 6 pooling needs 63 px). Read from torchvision 0.29 by
# running each network; tests check them the same way. The vision transformers (vit, maxvit) run
# at their own size, or sizes their windows divide, only: not a minimum, and left out.
MIN_INPUT_SIZE = {
    "alexnet": 63, "convnext": 32, "densenet": 29, "inception_v3": 75, "squeezenet1_0": 21,
    "squeezenet1_1": 17, "vgg": 32,
}


@lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def _by_family(table: dict, name: str):
    """The entry of ``table`` whose key is the longest prefix of ``name``, or None."""
    for prefix in sorted(table, key=len, reverse=True):
        if name.startswith(prefix):
            return table[prefix]
    return None


def torchvision_spec(name: str, model_id: str | None = None, aliases: tuple[str, ...] = (),
                     weight_tag: str = "") -> ModelSpec:
    """The spec of ``name`` with the weights ``weight_tag`` names (e.g. IMAGENET1K_V1; "" = torchvision's
    current default): input size, resize and normalisation follow the weights chosen."""
    import torchvision

    weights = torchvision.models.get_model_weights(name)[weight_tag or "DEFAULT"]
    t = weights.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    kwargs = {}
    if name in ("googlenet", "inception_v3"):
        kwargs = {"aux_logits": False, "init_weights": False}  # one head, like the study's fine-tune
    return ModelSpec(
        id=model_id or f"torchvision/{name}",
        framework="pytorch",
        source="torchvision",
        architecture=name,
        input_size=crop,
        min_input_size=_by_family(MIN_INPUT_SIZE, name),
        crop_pct=crop / resize,
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
        interpolation=t.interpolation.value,
        classifier=_by_family(CLASSIFIER_ATTR, name),
        license="BSD-3-Clause (torchvision); weights: ImageNet terms",
        weight_source=weights.url,
        weight_file=os.path.basename(weights.url),
        weight_tag=weight_tag,
        params=int(weights.meta.get("num_params", 0)) or None,
        build_kwargs=kwargs,
        aliases=aliases,
    )


def torchvision_create(spec: ModelSpec, num_classes: int):
    """The network with a ``num_classes`` head and random weights."""
    import torchvision

    return torchvision.models.get_model(spec.architecture, weights=None, num_classes=num_classes, **spec.build_kwargs)


def in_torch_hub(filename: str) -> bool:
    """Whether torch.hub's cache holds ``filename`` (torchvision's and some timm weights land there)."""
    import torch

    return bool(filename) and (Path(torch.hub.get_dir()) / "checkpoints" / filename).is_file()


def torchvision_weights_offline(spec: ModelSpec) -> bool:
    return in_torch_hub(spec.weight_file)
