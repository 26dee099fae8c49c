"""results.csv and relative.csv: absolute figures, and figures relative to a baseline model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bakeoff.errors import BakeoffError
from bakeoff.measure import (ALPHA, chance_level, chance_p, mcnemar_p, paired_cells, paired_ratio_interval,
                             resampled_paired)

__all__ = ["results_frame", "relative_frame", "pick_baseline", "pareto_mask", "at_chance", "display_status",
           "chance_warning", "weights_kind", "weights_warning", "small_split_warning", "same_images_cells",
           "paired_against",
           "RESULT_COLUMNS", "PER_IMAGE_COLUMNS", "RELATIVE_COLUMNS", "CHANCE_STATUS", "figure_kind"]

RESULT_COLUMNS = [
    "model", "framework", "status", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "p_vs_baseline", "n_val",
    "top5", "macro_f1",
    "train_time_s", "train_time_kind", "setup_time_s", "latency_ms_p50", "latency_ms_p95", "latency_kind",
    "throughput_img_s", "params", "size_mb",
    "chance_accuracy", "above_chance", "peak_memory_mb", "train_images_per_s", "data_fraction", "data_resident",
    "data_reused", "weights",
    "input_size", "precision", "device_name", "latency_form", "latency_eager_ms_p50", "latency_eager_ms_p95",
    "throughput_kind", "train_time_basis", "train_step_ms", "train_step_ms_min", "train_step_ms_max",
    "step_mode", "compiled_from_epoch", "compile_time_s", "compile_wait_s", "compile_error",
    "concurrent_trials", "train_wall_s",
    "gpu_wait_s", "shared_gpu_error",
    "endpoint_latency_ms_p50", "endpoint_latency_ms_p95", "onnx_cpu_latency_ms_p50",
    "onnx_cpu_latency_ms_p95", "backend", "error",
]
# Each validation image's predicted and true class: the results frame carries them for the paired
# tests, results.csv does not (one list per model would swamp it).
PER_IMAGE_COLUMNS = ["val_pred", "val_true"]
RELATIVE_COLUMNS = ["model", "framework", "weights", "relative_accuracy", "relative_accuracy_ci_low",
                    "relative_accuracy_ci_high", "p_vs_baseline", "relative_training_time", "train_time_kind",
                    "relative_inference_time", "latency_kind", "pareto", "pareto_training", "pareto_inference", "at_chance",
                    "baseline"]
CHANCE_STATUS = "not distinguishable from chance"


def results_frame(trials: list[dict], order: list[str]) -> pd.DataFrame:
    """One row per model of ``order`` (trials are store rows); a model never tried is absent.

    Columns: ``RESULT_COLUMNS`` (``p_vs_baseline`` empty until a baseline is picked), then
    ``PER_IMAGE_COLUMNS`` (integer arrays, None for trials stored before they were kept)."""
    by_model = {t["model"]: t for t in trials}
    rows = []
    for model in order:
        t = by_model.get(model)
        if t is None:
            continue
        row = {c: None for c in RESULT_COLUMNS + PER_IMAGE_COLUMNS}
        row.update({"model": model, "framework": t["framework"], "status": t["status"], "error": t["error"]})
        result = t["result"] or {}
        row.update({k: v for k, v in result.items() if k in RESULT_COLUMNS and k != "model"})
        row["p_vs_baseline"] = None  # a figure of this comparison, not of the trial
        for k in PER_IMAGE_COLUMNS:
            if result.get(k) is not None:
                row[k] = np.asarray(result[k], dtype=np.int64)
        cm = result.get("confusion_matrix")
        if t["status"] == "ok" and cm:  # the same chance test for every row, whenever it was stored
            cm = np.asarray(cm)
            row["chance_accuracy"], row["above_chance"] = chance_level(cm.sum(axis=1), int(np.trace(cm)))
            row["n_val"] = int(cm.sum())
        rows.append(row)
    return pd.DataFrame(rows, columns=RESULT_COLUMNS + PER_IMAGE_COLUMNS)


def _array(v) -> np.ndarray | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else np.asarray(v)


def same_images_cells(a, b) -> tuple[int, int, int, int] | None:
    """``paired_cells`` of two results rows (both right, only a, only b, both wrong), or None where
    either lacks per-image predictions or the two were not scored on the same labels in the same
    order (a different split: nothing to pair)."""
    pa, ta, pb, tb = (_array(r.get(k)) for r in (a, b) for k in PER_IMAGE_COLUMNS)
    if any(x is None for x in (pa, ta, pb, tb)):
        return None
    if not len(pa) == len(ta) == len(pb) == len(tb) or not np.array_equal(ta, tb):
        return None
    return paired_cells(pa == ta, pb == tb)


def weights_kind(description) -> str | None:
    """What a trial started from, in one word: imagenet, random-init, or file (ImageNet weights
    from a local file); None where not recorded."""
    if not isinstance(description, str) or not description:
        return None
    if description.startswith("random"):
        return "random-init"
    if "(file " in description:
        return "file"
    return "imagenet" if description.startswith("imagenet") else description


# How a latency other than the in-process one was taken (relative.csv's latency_kind for it).
OTHER_LATENCY_KINDS = {"endpoint_latency_ms_p50": "HTTP endpoint", "onnx_cpu_latency_ms_p50": "ONNX Runtime CPU"}


def figure_kind(results: pd.DataFrame, column: str) -> str:
    """How a figure of the finished rows was taken (``train_time_kind``, ``latency_kind``): the
    one kind all share, or "mixed: ..." naming each, so a table or axis never hides a mix."""
    ok = results[results["status"] == "ok"] if "status" in results.columns else results
    kinds = [k for k in dict.fromkeys(ok[column].dropna().astype(str))] if column in ok.columns else []
    if not kinds:
        return "not recorded"
    return kinds[0] if len(kinds) == 1 else "mixed: " + ", ".join(kinds)


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
    """True for a finished trial whose accuracy is not distinguishable from chance (the largest
    class's share of the validation split, by ``measure.chance_p`` at 5%): nothing shows it learned,
    so its speed is no trade-off worth showing. Rows without the check (hand-made tables) count as
    distinguishable."""
    if "above_chance" not in results.columns:
        return pd.Series(False, index=results.index)
    return (results["status"] == "ok") & results["above_chance"].eq(False)


def display_status(results: pd.DataFrame) -> pd.Series:
    """The status a table shows: the stored one, or ``CHANCE_STATUS`` for a finished trial at chance."""
    return results["status"].astype(str).mask(at_chance(results), CHANCE_STATUS)


def _chance_p_of(r) -> float | None:
    acc, n, chance = (pd.to_numeric(r.get(k), errors="coerce") for k in ("accuracy", "n_val", "chance_accuracy"))
    if any(pd.isna(v) for v in (acc, n, chance)) or n <= 0:
        return None
    return chance_p(round(float(acc) * n), int(n), float(chance))


def chance_warning(results: pd.DataFrame) -> str | None:
    """One sentence naming the models not distinguishable from chance, with their figures and what
    to try, or None."""
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
        p = _chance_p_of(r)
        if p is not None:
            part += f", p = {p:.2g}"
        parts.append(part)
    one = len(parts) == 1
    return (f"{'; '.join(parts)}: {CHANCE_STATUS} (the share of the largest validation class; exact one-sided "
            f"binomial test at 5%), so nothing shows {'this model' if one else 'these models'} learned; "
            f"{'it is' if one else 'they are'} left out of the Pareto front and the recommendations; try a lower "
            f"--lr, more --epochs or pretrained weights")


def weights_warning(results: pd.DataFrame) -> str | None:
    """One sentence when the finished models started from different weights (some pretrained, some
    random): their figures then compare starts as much as architectures."""
    ok = results[results["status"] == "ok"]
    if "weights" not in ok.columns:
        return None
    kinds = ok["weights"].map(weights_kind)
    random = ok["model"][kinds == "random-init"].tolist()
    pretrained = ok["model"][kinds.isin(["imagenet", "file"])].tolist()
    if not random or not pretrained:
        return None
    return (f"{len(random)} model{'s' if len(random) > 1 else ''} started from random weights "
            f"({', '.join(random)}) and {len(pretrained)} from ImageNet weights ({', '.join(pretrained)}): "
            f"not like for like, compare within each group (the weights column says which)")


def small_split_warning(results: pd.DataFrame, baseline: str | None) -> str | None:
    """One sentence when the validation split is too small for its tests to find anything: even a
    perfect model would be indistinguishable from chance, or from the baseline."""
    ok = results[results["status"] == "ok"]
    known = [pd.to_numeric(ok[c], errors="coerce").dropna() if c in ok.columns else pd.Series(dtype=float)
             for c in ("n_val", "chance_accuracy")]
    if known[0].empty:
        return None
    n, chance = int(known[0].iloc[0]), known[1]  # one split for the whole run
    if not chance.empty:
        best = chance_p(n, n, float(chance.iloc[0]))
        if best >= ALPHA:
            return (f"the validation split ({n} images) is too small to tell any model from chance: even a "
                    f"perfect score would not be distinguishable from it (p = {best:.2g})")
    base = ok[ok["model"] == baseline]
    if base.empty or pd.isna(pd.to_numeric(base["accuracy"].iloc[0], errors="coerce")):
        return None
    wrong = n - round(float(base["accuracy"].iloc[0]) * n)
    best = mcnemar_p(wrong, 0)
    if best >= ALPHA:
        return (f"the validation split ({n} images) is too small to tell a better model from the baseline "
                f"{baseline}: it gets all but {wrong} right, so even a perfect model would not be "
                f"distinguishable from it (p = {best:.2g})")
    return None


def pick_baseline(results: pd.DataFrame, requested: str | None = None) -> tuple[str, str | None]:
    """The model the relative figures divide by, and a one-line warning when it is not the one meant.

    Meant: ``requested``, else the first model listed. When that model has no successful trial (or,
    unrequested, is not distinguishable from chance while another model is) the most accurate model
    distinguishable from chance takes its place (the most accurate finished one if none is).
    Raises when nothing finished.
    """
    ok = results[results["status"] == "ok"]
    if ok.empty:
        raise BakeoffError("no model finished successfully, so there is nothing to compare (see results.csv)")
    meant = requested if requested is not None else results["model"].iloc[0]
    chance = at_chance(ok)
    if meant in set(ok["model"]) and (requested is not None or not chance[ok["model"] == meant].any()
                                      or chance.all()):
        return meant, None
    pool = ok[~chance] if (~chance).any() else ok
    best = pool.loc[pd.to_numeric(pool["accuracy"], errors="coerce").fillna(-1).idxmax(), "model"]
    if meant in set(ok["model"]):
        why = CHANCE_STATUS
    elif meant in set(results["model"]):
        why = "its trial failed"
    else:
        why = "it has no trial"
    return best, (f"baseline {meant}: {why}; compared against {best}, the most accurate model "
                  f"{'distinguishable from chance' if (~chance).any() else 'that finished'}, instead")


def paired_against(rows: pd.DataFrame, base) -> tuple[list[float], np.ndarray]:
    """Each row's p-value against ``base`` and the interval of its accuracy ratio (rows x 2), on
    the same validation images: the exact McNemar test and the paired bootstrap of one trial
    each, or, for rows pooled over repeats (``accuracy_resamples``), the joint resamples over
    images and repeats (``measure.resampled_paired``). NaN where nothing pairs."""
    if "accuracy_resamples" in rows.columns:
        b = base.get("accuracy_resamples")
        pooled = [resampled_paired(a, b) if a is not None and b is not None else (math.nan,) * 3
                  for a in rows["accuracy_resamples"]]
        return [p for p, _, _ in pooled], np.array([(lo, hi) for _, lo, hi in pooled], dtype=float).reshape(-1, 2)
    cells = [same_images_cells(r, base) for _, r in rows.iterrows()]
    ci = np.array([paired_ratio_interval(c) if c else (math.nan, math.nan) for c in cells], dtype=float)
    return [mcnemar_p(c[1], c[2]) if c else math.nan for c in cells], ci.reshape(-1, 2)


def relative_frame(results: pd.DataFrame, baseline: str | None = None, inference: str = "latency_ms_p50"
                   ) -> tuple[pd.DataFrame, str]:
    """Figures relative to ``baseline`` (default: ``pick_baseline``'s); baseline row = 1.0.

    ``p_vs_baseline`` is the exact McNemar test of each model against the baseline on the same
    validation images, ``relative_accuracy_ci_low/high`` the paired bootstrap 95% interval of the
    accuracy ratio; both NaN where per-image predictions are missing (trials stored before they
    were kept) or were not made on the baseline's images. ``weights`` is ``weights_kind``.
    ``pareto`` is true for a model on the accuracy-vs-training-time front or on the
    accuracy-vs-inference-time front; a model at chance (``at_chance``) is on neither.
    """
    ok = results[results["status"] == "ok"].reset_index(drop=True)
    if baseline is None:
        baseline = pick_baseline(results)[0]
    if baseline not in set(results["model"]):
        raise BakeoffError(f"baseline {baseline!r} is not a model of this run; models: {', '.join(results['model'])}")
    if baseline not in set(ok["model"]):
        raise BakeoffError(f"baseline {baseline!r} has no successful trial; pick another with --baseline")
    chance = at_chance(ok).to_numpy()
    base = ok[ok["model"] == baseline].iloc[0]
    p_values, ci = paired_against(ok, base)
    rel = pd.DataFrame({
        "model": ok["model"],
        "framework": ok["framework"],
        "weights": ok["weights"].map(weights_kind) if "weights" in ok.columns else None,
        "relative_accuracy": ok["accuracy"].astype(float) / float(base["accuracy"]),
        "relative_training_time": ok["train_time_s"].astype(float) / float(base["train_time_s"]),
        "relative_inference_time": pd.to_numeric(ok[inference], errors="coerce")
        / float(pd.to_numeric(base[inference], errors="coerce")),  # endpoint/ONNX figures may be absent
        "relative_accuracy_ci_low": ci[:, 0],
        "relative_accuracy_ci_high": ci[:, 1],
        "p_vs_baseline": p_values,
        "train_time_kind": ok["train_time_kind"] if "train_time_kind" in ok.columns else None,
        "latency_kind": ok["latency_kind"] if inference == "latency_ms_p50" and "latency_kind" in ok.columns
        else OTHER_LATENCY_KINDS.get(inference),
    })
    if "accuracy_by_repeat" in ok.columns:  # each repeat over the baseline's mean: the model's own spread
        rel["relative_accuracy_by_repeat"] = [np.asarray(a, dtype=float) / float(base["accuracy"])
                                              for a in ok["accuracy_by_repeat"]]
    learned = rel["relative_accuracy"].where(~chance)  # NaN: never on a front
    rel["pareto_training"] = pareto_mask(learned, rel["relative_training_time"])
    rel["pareto_inference"] = pareto_mask(learned, rel["relative_inference_time"])
    rel["at_chance"] = chance
    rel["pareto"] = rel["pareto_training"] | rel["pareto_inference"]
    rel["baseline"] = rel["model"] == baseline
    return rel, baseline
