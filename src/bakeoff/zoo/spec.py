"""The description of one model: where it comes from and how its inputs look."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["ModelSpec", "safe_name"]


@dataclass(frozen=True)
class ModelSpec:
    id: str
    framework: str  # "pytorch" | "tensorflow": a key of engines.ENGINES
    source: str  # "torchvision" | "timm" | "keras": a key of zoo.registry.SOURCES
    architecture: str  # the source library's own name
    input_size: int
    # The smallest side the network runs at (None: any the run allows). A smaller --image-size is
    # upsampled to it inside the model, by every engine alike, and recorded as input_upsampled_to.
    min_input_size: int | None = None
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    classifier: str | tuple[str, ...] | None = None  # attribute path(s) of the classification layer(s)
    license: str = "unknown"
    weight_source: str = ""  # where ImageNet weights come from (URL, hub id, package)
    weight_file: str = ""  # the file name the source library downloads, for --weights-dir
    weight_tag: str = ""  # which of the source's ImageNet weights (torchvision: IMAGENET1K_V1); "" = its default
    params: int | None = None
    build_kwargs: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        d["aliases"] = tuple(d.get("aliases", ()))
        return cls(**d)


def safe_name(model_id: str) -> str:
    """A folder name for a model id (``timm/resnet50`` -> ``timm__resnet50``)."""
    return model_id.replace("/", "__").replace(":", "_")
