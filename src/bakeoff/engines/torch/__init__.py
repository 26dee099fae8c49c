"""The PyTorch engine: build (torchvision/timm with a new head), step (one training step,
CUDA-graphed where it can be), fit (the epoch loop), infer (latency), compile (background
compiles), trial (one trial end to end, saved models)."""

from bakeoff.engines.torch.build import count_params
from bakeoff.engines.torch.trial import load_predict, load_saved, run_trial

__all__ = ["run_trial", "load_saved", "load_predict", "count_params"]
