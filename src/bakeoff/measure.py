"""Measurements: accuracy metrics with intervals, and honest latency/throughput timing."""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

__all__ = ["classification_metrics", "wilson_interval", "chance_level", "time_calls", "summarize_ms"]


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: sound at small n and near 0 or 1."""
    if total == 0:
        return (math.nan, math.nan)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def chance_level(support, correct: int) -> tuple[float, bool]:
    """The accuracy of always answering the largest validation class, and whether ``correct``
    answers out of ``sum(support)`` beat it beyond the 95% interval.

    A model that collapsed onto one class (or never left its initial guess) scores exactly this
    share: its accuracy says nothing about the model, only about the class balance.
    """
    support = np.asarray(support)
    n = int(support.sum())
    if n == 0:
        return (math.nan, False)
    chance = float(support.max() / n)
    return (chance, bool(wilson_interval(correct, n)[0] > chance))


def validation_figures(probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """An epoch's validation loss and accuracy from predicted probabilities ``probs`` (one row
    per image) and labels ``y``: mean cross-entropy (a zero probability counts as 1e-12) and
    top-1. Every engine scores its epochs with this, so their curves compare."""
    picked = np.clip(probs[np.arange(len(y)), y], 1e-12, None)
    return float(-np.log(picked).mean()), float((probs.argmax(1) == y).mean())


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Top-1 (with 95% CI), top-5, macro-F1, per-class accuracy, the confusion matrix, and the
    chance level (the largest class's share) with whether top-1 is clearly above it."""
    from sklearn.metrics import confusion_matrix, f1_score

    k = len(classes)
    labels = np.arange(k)
    pred = probs.argmax(axis=1)
    correct = int((pred == y_true).sum())
    n = len(y_true)
    lo, hi = wilson_interval(correct, n)
    cm = confusion_matrix(y_true, pred, labels=labels)
    support = cm.sum(axis=1)
    per_class = {c: (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    chance, above = chance_level(support, correct)
    top5 = float((np.argsort(-probs, axis=1)[:, :5] == y_true[:, None]).any(axis=1).mean())
    return {
        "accuracy": correct / n,
        "accuracy_ci_low": lo,
        "accuracy_ci_high": hi,
        "top5": top5,
        "macro_f1": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
        "n_val": n,
        "chance_accuracy": chance,
        "above_chance": above,
    }


def time_calls(fn: Callable[[], None], sync: Callable[[], None], warmup: int, runs: int) -> list[float]:
    """Milliseconds per call of ``fn``, each run bracketed by device synchronisation."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return samples


def summarize_ms(samples: list[float]) -> dict:
    a = np.asarray(samples)
    return {"p50": float(np.median(a)), "p95": float(np.percentile(a, 95)), "min": float(a.min()),
            "max": float(a.max()), "n": int(len(a))}
