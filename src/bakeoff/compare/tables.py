"""results.csv and relative.csv: absolute figures, and figures relative to a baseline model."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bakeoff.errors import BakeoffError
from bakeoff.measure import chance_level

__all__ = ["results_frame", "relative_frame", "pareto_mask", "at_chance", "display_status", "chance_warning", "RESULT_COLUMNS"]

RESULT_COLUMNS = [
    "model", "framework", "status", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "top5", "macro_f1",
    "train_time_s", "latency_ms_p50", "latency_ms_p95", "throughput_img_s", "params", "size_mb",
    "chance_accuracy", "above_chance", "peak_memory_mb", "train_images_per_s", "data_fraction", "data_resident",
    "data_reused", "weights",
    "input_size", "precision", "device_name", "latency_kind", "latency_cudagraph_ms_p50",
    "latency_cudagraph_ms_p95", "step_mode", "compiled_from_epoch", "compile_time_s", "compile_error",
    "concurrent_trials", "train_time_kind", "train_wall_s",
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
            cm = t["result"].get("confusion_matrix")
            if row["above_chance"] is None and t["status"] == "ok" and cm:  # stored before the chance check
                cm = np.asarray(cm)
                row["chance_accuracy"], row["above_chance"] = chance_level(cm.sum(axis=1), int(np.trace(cm)))
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


def at_chance(results: pd.DataFrame) -> pd.Series:
    """True for a finished trial whose accuracy is not clearly above chance (the largest class's
    share of the validation split): it did not learn, so its speed is no trade-off worth showing.
    Rows without the check (hand-made tables) count as above chance."""
    if "above_chance" not in results.columns:
        return pd.Series(False, index=results.index)
    return (results["status"] == "ok") & results["above_chance"].eq(False)


def display_status(results: pd.DataFrame) -> pd.Series:
    """The status a table shows: the stored one, or "at chance" for a finished trial at chance."""
    return results["status"].astype(str).mask(at_chance(results), "at chance")


def chance_warning(results: pd.DataFrame) -> str | None:
    """One sentence naming the models at chance, with their figures and what to try, or None."""
    low = results[at_chance(results)]
    if low.empty:
        return None
    parts = []
    for _, r in low.iterrows():
        part = f"{r['model']} {100 * float(r['accuracy']):.1f}%"
        if pd.notna(r.get("accuracy_ci_low")) and pd.notna(r.get("accuracy_ci_high")):
            part += f" (95% CI {100 * float(r['accuracy_ci_low']):.1f}–{100 * float(r['accuracy_ci_high']):.1f}%)"
        if pd.notna(r.get("chance_accuracy")):
            part += f", chance {100 * float(r['chance_accuracy']):.1f}%"
        parts.append(part)
    one = len(parts) == 1
    return (f"{'; '.join(parts)}: not clearly above chance (the share of the largest validation class), so "
            f"nothing shows {'this model' if one else 'these models'} learned; {'it is' if one else 'they are'} "
            f"left out of the Pareto front and the recommendations; try a lower --lr, more --epochs or "
            f"pretrained weights")


def relative_frame(results: pd.DataFrame, baseline: str | None = None, inference: str = "latency_ms_p50"
                   ) -> tuple[pd.DataFrame, str]:
    """Figures relative to ``baseline`` (default: the first successful model above chance, else the
    first successful one); baseline row = 1.0.

    ``pareto`` is true for a model on the accuracy-vs-training-time front or on the
    accuracy-vs-inference-time front; a model at chance (``at_chance``) is on neither.
    """
    ok = results[results["status"] == "ok"].reset_index(drop=True)
    if ok.empty:
        raise BakeoffError("no model finished successfully, so there is nothing to compare (see results.csv)")
    chance = at_chance(ok).to_numpy()
    if baseline is None:
        baseline = ok["model"][~chance].iloc[0] if (~chance).any() else ok["model"].iloc[0]
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
    learned = rel["relative_accuracy"].where(~chance)  # NaN: never on a front
    rel["pareto_training"] = pareto_mask(learned, rel["relative_training_time"])
    rel["pareto_inference"] = pareto_mask(learned, rel["relative_inference_time"])
    rel["at_chance"] = chance
    rel["pareto"] = rel["pareto_training"] | rel["pareto_inference"]
    rel["baseline"] = rel["model"] == baseline
    return rel, baseline
