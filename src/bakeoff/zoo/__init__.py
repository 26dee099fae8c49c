"""The model zoo: one spec per model, resolved by id (study ids, torchvision/<name>, timm/<name>)."""

from bakeoff.zoo.registry import ModelSpec, list_specs, resolve, weights_available_offline

__all__ = ["ModelSpec", "list_specs", "resolve", "weights_available_offline"]
