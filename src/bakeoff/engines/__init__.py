"""One engine per framework, a package each (build, fit, infer, trial), chosen in ``ENGINES``.

Every engine package offers ``run_trial(job, on_step, gate)`` (train and measure one model: the
result row), ``load_saved(model_dir, device)`` and ``load_predict(model_dir, device)`` (a saved
model for serving), and ``count_params(spec)`` (the parameters of the network it builds). A package is imported only when used: a PyTorch-only process never imports
the Keras engine's backend.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

__all__ = ["Engine", "ENGINES", "engine_for"]


@dataclass(frozen=True)
class Engine:
    """What the rest of bakeoff needs to know about one framework's engine."""

    framework: str
    package: str
    install_hint: str  # what to install when its library is missing
    weight_files: tuple[str, ...]  # extensions of local weights files, in order of preference
    shares_process: bool = False  # trials may run one after another, and side by side, in one worker
    compiles: bool = False  # trials may load a training step compiled in the background
    exports: bool = False  # ONNX / TorchScript export

    def load(self) -> ModuleType:
        """The engine's package (``run_trial``, ``load_saved``, ``load_predict``)."""
        return importlib.import_module(self.package)


ENGINES: dict[str, Engine] = {
    "pytorch": Engine("pytorch", "bakeoff.engines.torch", "pip install bakeoff", (".pth", ".pt", ".bin", ".safetensors"),
                      shares_process=True, compiles=True, exports=True),
    "tensorflow": Engine("tensorflow", "bakeoff.engines.keras", "pip install 'bakeoff[tensorflow]'",
                         (".weights.h5", ".h5", ".npz")),
}


def engine_for(framework: str) -> Engine:
    try:
        return ENGINES[framework]
    except KeyError:
        raise ValueError(f"no engine for framework {framework!r}") from None
