"""What crosses between a runner and an engine: the trial's job in, its fit's figures, its stored row out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["TrialJob", "FitResult", "RunAlone", "result_row"]


@dataclass
class TrialJob:
    """Everything a trial process needs; plain data so it crosses process boundaries."""

    spec: dict
    protocol: dict
    cache_path: str
    input_size: int
    labels: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    classes: list[str]
    out_dir: str
    device: str = "auto"
    weights_dir: str | None = None
    key: str = ""
    side: int | None = None  # the model's resize size; the cache may be stored at another
    cache_root: str | None = None  # the run's cache folder (decoded images, compiled kernels)
    # Set by the run: its background compiles (``engines.torch.compile.Compiles.start``).
    compile: dict | None = None  # this model's compile: cache folder, marker key, device, process id
    background: dict | None = None  # every compile of the run: {"host": ..., "pids": [...]}
    # Set where a run has repeats (``api.repeat_protocols``).
    repeat: int | None = None  # which repeat (its seed is the protocol's)
    repeat_dir: str | None = None  # OUT's subfolder its model is saved in (repeats after the first)
    # Set by the local runner as it hands the job to a worker.
    keep_data: bool = False  # the worker keeps the decoded images resident for its next trial
    concurrent_trials: int = 1  # trials its worker runs at once (a process each: trials on its GPU at once)
    gpu_gate: str | None = None  # lock files shared by the processes of its GPU (``process_gate``)
    alone: bool = False  # it could not share its GPU: it runs again in a process of its own
    shared_gpu_error: str | None = None  # why it could not share


@dataclass
class FitResult:
    """What an engine's fit returns: the epochs' figures, the final validation probabilities, and
    how the training time was taken (``bakeoff.timing``); what an engine does not do stays None."""

    history: list[dict]
    final_val_probs: np.ndarray
    train_time_s: float | None
    eval_time_s: float
    data_time_s: float
    train_wall_s: float
    train_time_kind: str | None = None
    train_time_basis: str | None = None
    train_step_ms: float | None = None
    train_step_ms_min: float | None = None
    train_step_ms_max: float | None = None
    step_mode: str | None = None
    capture_time_s: float | None = None
    capture_error: str | None = None
    feature_time_s: float | None = None
    compiled_from_epoch: int | None = None
    compile_time_s: float | None = None
    compile_error: str | None = None
    compile_wait_s: float | None = None


@dataclass(frozen=True)
class RunAlone:
    """A trial's answer instead of a result when it cannot share its GPU (its training step
    could not be captured beside other trials): the runner runs it again in a process of its own."""

    reason: str


def result_row(spec, job: TrialJob, protocol, metrics: dict, fitted: FitResult, timing: dict, *, build_s: float,
               load_s: float, params: int, model_path: Path, peak: tuple[float, str], weights: str,
               **engine_fields) -> dict:
    """The stored row of a finished trial, the same keys whatever the engine; ``engine_fields``
    adds what only one engine knows (precision, device, step mode, backend, ...)."""
    train_s = fitted.train_time_s
    return {
        "model": spec.id,
        "framework": spec.framework,
        "source": spec.source,
        "status": "ok",
        **metrics,
        "train_time_s": train_s,
        # how train_time_s was taken (``bakeoff.timing``), the same keys for every engine
        **{k: getattr(fitted, k) for k in ("train_time_kind", "train_time_basis", "train_step_ms", "train_step_ms_min",
                                      "train_step_ms_max")},
        "data_time_s": fitted.data_time_s,
        # Share of the trial's data + training time spent getting images ready (cache load included).
        "data_fraction": (load_s + fitted.data_time_s) / (load_s + train_s) if train_s else None,
        "eval_time_s": fitted.eval_time_s,
        "build_time_s": build_s,
        "load_time_s": load_s,
        "train_images_per_s": len(job.train_idx) * protocol.epochs / train_s if train_s else None,
        **timing,
        "params": int(params),
        "size_mb": model_path.stat().st_size / 2**20,
        "peak_memory_mb": peak[0],
        "peak_memory_kind": peak[1],
        "history": fitted.history,
        "weights": weights,
        "input_size": job.input_size,
        "model_dir": str(model_path.parent.relative_to(job.out_dir)),
        **engine_fields,
    }
