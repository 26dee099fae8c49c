"""results.csv and relative.csv: absolute figures, and figures relative to a baseline model."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bakeoff.errors import BakeoffError

__all__ = ["results_frame", "relative_frame", "pareto_mask", "RESULT_COLUMNS"]

RESULT_COLUMNS = [
    "model", "framework", "status", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "top5", "macro_f1",
    "train_time_s", "latency_ms_p50", "latency_ms_p95", "throughput_img_s", "params", "size_mb",
    "peak_memory_mb", "train_images_per_s", "data_fraction", "data_resident", "data_reused", "weights",
    "input_size", "precision", "device_name", "latency_kind", "latency_cudagraph_ms_p50",
    "latency_cudagraph_ms_p95", "step_mode", "concurrent_trials", "train_time_kind", "train_wall_s",
    "gpu_wait_s", "shared_gpu_error",
    "endpoint_latency_ms_p50", "endpoint_latency_ms_p95", "onnx_cpu_latency_ms_p50",
    "onnx_cpu_latency_ms_p95", "backend", "error",
]


def results_frame(trials: list[dict], order: list[str]) -> pd.DataFrame:
    """One row per model of ``order`` (trials are store rows); a model never tried is absent."""
    by_model = {t["model"]: t for t in trials}
    rows = []
    for model in order:
        t = by_model.get(model)
        if t is None:
            continue
        row = {c: None for c in RESULT_COLUMNS}
        row.update({"model": model, "framework": t["framework"], "status": t["status"], "error": t["error"]})
        if t["result"]:
            row.update({k: v for k, v in t["result"].items() if k in RESULT_COLUMNS and k != "model"})
        rows.append(row)
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def pareto_mask(accuracy: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """True where no other point is at least as accurate and as cheap, and better in one."""
    acc, cost = np.asarray(accuracy, float), np.asarray(cost, float)
    keep = np.zeros(len(acc), dtype=bool)
    for i in range(len(acc)):
        if np.isnan(acc[i]) or np.isnan(cost[i]):
            continue
        dominated = (acc >= acc[i]) & (cost <= cost[i]) & ((acc > acc[i]) | (cost < cost[i]))
        keep[i] = not dominated.any()
    return keep


def relative_frame(results: pd.DataFrame, baseline: str | None = None, inference: str = "latency_ms_p50"
                   ) -> tuple[pd.DataFrame, str]:
    """Figures relative to ``baseline`` (default: the first successful model); baseline row = 1.0.

    ``pareto`` is true for a model on the accuracy-vs-training-time front or on the
    accuracy-vs-inference-time front.
    """
    ok = results[results["status"] == "ok"].reset_index(drop=True)
    if ok.empty:
        raise BakeoffError("no model finished successfully, so there is nothing to compare (see results.csv)")
    if baseline is None:
        baseline = ok["model"].iloc[0]
    if baseline not in set(results["model"]):
        raise BakeoffError(f"baseline {baseline!r} is not a model of this run; models: {', '.join(results['model'])}")
    if baseline not in set(ok["model"]):
        raise BakeoffError(f"baseline {baseline!r} has no successful trial; pick another with --baseline")
    base = ok[ok["model"] == baseline].iloc[0]
    rel = pd.DataFrame({
        "model": ok["model"],
        "framework": ok["framework"],
        "relative_accuracy": ok["accuracy"].astype(float) / float(base["accuracy"]),
        "relative_training_time": ok["train_time_s"].astype(float) / float(base["train_time_s"]),
        "relative_inference_time": pd.to_numeric(ok[inference], errors="coerce")
        / float(pd.to_numeric(base[inference], errors="coerce")),  # endpoint/ONNX figures may be absent
        "relative_accuracy_ci_low": ok["accuracy_ci_low"].astype(float) / float(base["accuracy"]),
        "relative_accuracy_ci_high": ok["accuracy_ci_high"].astype(float) / float(base["accuracy"]),
    })
    rel["pareto_training"] = pareto_mask(rel["relative_accuracy"], rel["relative_training_time"])
    rel["pareto_inference"] = pareto_mask(rel["relative_accuracy"], rel["relative_inference_time"])
    rel["pareto"] = rel["pareto_training"] | rel["pareto_inference"]
    rel["baseline"] = rel["model"] == baseline
    return rel, baseline
