"""The frozen hyperparameters every model of one run is trained and measured with."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

from bakeoff.errors import BakeoffError

__all__ = ["Protocol", "PRESETS", "apply_preset"]

OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILES = ("auto", "off")
# The decoded cache holds every image at side x side x 3 bytes: 100000 asked for 1.2 TB for 36 images.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024


@dataclass(frozen=True)
class Protocol:
    """One identical training and measuring recipe for every model of a run.

    Each model still keeps its own input size and normalisation from its spec, unless
    ``image_size`` overrides the size for all of them (a smoke-run switch).
    """

    epochs: int = 5
    lr: float = 0.001
    batch_size: int = 16
    optimizer: str = "adam"
    train_only_top_layer: bool = False
    augment: str = "rrc-flip"  # random-resized-crop + horizontal flip; "none" = centre crop only
    # Every new classifier starts at zero weights and bias, whatever its source (the engines'
    # build_model). One value, recorded: trials trained before, with each source's own random
    # head, have other keys and train again instead of resuming as these.
    head_init: str = "zeros"
    # Batch-norm running statistics of random-init models move at PyTorch's rate (0.1 a step) in
    # every framework (engines.keras.build.torch_rate_batch_norm); recorded like head_init.
    random_init_bn: str = "torch-rate"
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast + channels-last on CUDA, fp32 on CPU
    pretrained: bool | str = True  # True, False, or "offline": weights only where they need no network
    image_size: int | None = None
    cuda_graphs: bool = True  # capture the training step in a CUDA graph on GPUs (same arithmetic, less overhead)
    val_every: int = 1  # validate after every N-th epoch; the last epoch is always validated
    # auto: graphed CUDA steps switch to compiled kernels once compiled (engines.torch.compile); off:
    # eager kernels throughout. Runs with repeated seeds ended at the same accuracy either way
    # (docs/results.md, "Compiled against eager kernels, seed by seed").
    compile: str = "auto"
    latency_runs: int = 50
    latency_warmup: int = 10
    throughput_batch: int = 64

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise BakeoffError(f"--epochs must be at least 1, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):  # nan > 0 is False too
            raise BakeoffError(f"--lr must be a finite number above 0, e.g. 0.001, got {self.lr}")
        if self.batch_size < 1:
            raise BakeoffError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise BakeoffError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise BakeoffError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile not in COMPILES:
            raise BakeoffError(f"--compile must be one of {', '.join(COMPILES)}, got {self.compile!r}")
        if self.random_init_bn != "torch-rate":
            raise BakeoffError(f"random_init_bn must be 'torch-rate', got {self.random_init_bn!r}")
        if self.head_init != "zeros":
            raise BakeoffError(f"head_init must be 'zeros' (the one head initialisation), got {self.head_init!r}")
        if self.augment not in ("rrc-flip", "none"):
            raise BakeoffError(f"augment must be 'rrc-flip' or 'none', got {self.augment!r}")
        if self.pretrained not in (True, False, "offline"):
            raise BakeoffError(f"pretrained must be True, False or 'offline', got {self.pretrained!r}")
        if self.image_size is not None and not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise BakeoffError(
                f"--image-size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}, got {self.image_size}: "
                f"the pretrained models expect 224-600 pixels, and every image is kept decoded at this size "
                f"({MAX_IMAGE_SIZE} is already 3 MB an image)")
        if not 0 <= self.seed < 2**32:
            raise BakeoffError(f"--seed must be between 0 and {2**32 - 1}, got {self.seed}")
        if self.val_every < 1:
            raise BakeoffError(f"--val-every must be at least 1 (epochs), got {self.val_every}")
        if self.latency_runs < 50:
            raise BakeoffError("latency_runs must be at least 50 for a meaningful p95")

    def validates(self, epoch: int) -> bool:
        """Whether the validation split is scored after ``epoch`` (0-based)."""
        return (epoch + 1) % self.val_every == 0 or epoch == self.epochs - 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A short stable hash: trials with the same protocol, model and data are the same trial."""
        d = self.to_dict()
        # Fields added later are left out at the value every run before them had (validation
        # each epoch, eager kernels), so the trials those runs stored keep their keys.
        for name, before in (("val_every", 1), ("compile", "off")):
            if d[name] == before:
                del d[name]
        blob = json.dumps(d, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Preset:
    """A named protocol and model list; ``differences`` says where it departs from what it
    reproduces (printed at a run's start and stored with the run, so its report says it too)."""

    protocol: dict
    models: tuple[str, ...]
    baseline: str | None = None
    doc: str = ""
    extra: dict = field(default_factory=dict)
    differences: tuple[str, ...] = ()

    def notice(self, name: str) -> str:
        """The block a run with this preset prints before it starts."""
        lines = [f"preset {name}: {self.doc}"]
        if self.differences:
            lines.append("where this run differs from the published study:")
            lines += [f"  - {d}" for d in self.differences]
        return "\n".join(lines)

    def record(self, name: str) -> dict:
        """What the run's stored protocol adds for this preset (shown in "How it was measured")."""
        return {"preset": name, **({"differences_from_study": "; ".join(self.differences)} if self.differences else {})}


# The published study: 5 epochs, lr 0.001, batch 16, Adam; 15 models, 8 TensorFlow (run with the
# Keras engine) and 7 PyTorch, compared relative to TensorFlow's inception-v3.
PRESETS: dict[str, Preset] = {
    "jumpstart-blog": Preset(
        protocol=dict(epochs=5, lr=0.001, batch_size=16, optimizer="adam"),
        models=(
            "tensorflow-ic-imagenet-inception-v3-classification-4",
            "tensorflow-ic-imagenet-inception-resnet-v2-classification-4",
            "tensorflow-ic-imagenet-mobilenet-v2-050-224-classification-4",
            "tensorflow-ic-imagenet-mobilenet-v2-075-224-classification-4",
            "tensorflow-ic-imagenet-mobilenet-v2-140-224-classification-4",
            "tensorflow-ic-tf2-preview-mobilenet-v2-classification-4",
            "tensorflow-ic-imagenet-resnet-v2-152-classification-4",
            "tensorflow-ic-bit-s-r101x1-ilsvrc2012-classification-1",
            "pytorch-ic-alexnet",
            "pytorch-ic-densenet121",
            "pytorch-ic-densenet201",
            "pytorch-ic-googlenet",
            "pytorch-ic-mobilenet-v2",
            "pytorch-ic-resnet152",
            "pytorch-ic-resnet34",
        ),
        baseline="tensorflow-ic-imagenet-inception-v3-classification-4",
        doc="the study's protocol (5 epochs, lr 0.001, batch 16, Adam), its 15 models and its baseline",
        differences=(
            "TensorFlow models are Keras Applications networks with Keras's ImageNet weights (BiT-S R101x1: "
            "Google's released checkpoint), not the TF-Hub modules the study fine-tuned",
            "PyTorch models load torchvision's IMAGENET1K_V1 weights, those of the study's era "
            "(resnet152's and mobilenet_v2's default is IMAGENET1K_V2 today)",
            "augmentation is random-resized-crop + horizontal flip for every model; the study used its "
            "training scripts' defaults (TF-Hub / JumpStart)",
            "every new classifier head starts at zero weights and bias; the study's started from each "
            "framework's own random initialisation",
            "on a GPU, training runs under bf16 autocast (channels-last), where the study trained in fp32 "
            "(--precision fp32 matches it)",
            "on a CUDA GPU, PyTorch steps switch to compiled kernels once they are ready (--compile off keeps "
            "eager kernels, as the study ran)",
            "inference time is in-process batch-1 latency; the study timed one image per request to an "
            "endpoint (--endpoint-latency N measures that too)",
        ),
    ),
}


def apply_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise BakeoffError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
