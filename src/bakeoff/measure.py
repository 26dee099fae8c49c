"""Measurements: accuracy metrics with intervals, and honest latency/throughput timing."""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

__all__ = ["classification_metrics", "wilson_interval", "chance_level", "chance_p", "paired_cells", "mcnemar_p",
           "paired_ratio_interval", "epoch_record", "ALPHA", "time_calls", "summarize_ms", "softmax"]


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: sound at small n and near 0 or 1."""
    if total == 0:
        return (math.nan, math.nan)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


ALPHA = 0.05  # the level of every test the comparison states ("distinguishable", "better than")


def chance_p(correct: int, total: int, chance: float) -> float:
    """One-sided exact binomial p-value of scoring ``correct`` of ``total`` or more when each answer
    is right with probability ``chance``: small means the model is distinguishable from chance."""
    from scipy.stats import binomtest

    return float(binomtest(int(correct), int(total), min(max(float(chance), 0.0), 1.0),
                           alternative="greater").pvalue)


def chance_level(support, correct: int) -> tuple[float, bool]:
    """The accuracy of always answering the largest validation class, and whether ``correct``
    answers out of ``sum(support)`` are distinguishable from it (``chance_p`` below ``ALPHA``).

    A model that collapsed onto one class (or never left its initial guess) scores exactly this
    share: its accuracy says nothing about the model, only about the class balance.
    """
    support = np.asarray(support)
    n = int(support.sum())
    if n == 0:
        return (math.nan, False)
    chance = float(support.max() / n)
    return (chance, bool(chance_p(correct, n, chance) < ALPHA))


def paired_cells(a_correct, b_correct) -> tuple[int, int, int, int]:
    """Counts over the same images: (both right, only a right, only b right, both wrong)."""
    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    return (int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum()))


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact McNemar test of two models scored on the same images: the two-sided binomial test of
    the discordant images (``only_a`` right only for a, ``only_b`` only for b) at one half.
    1.0 when they disagree on no image."""
    from scipy.stats import binomtest

    n = int(only_a) + int(only_b)
    return float(binomtest(int(only_a), n, 0.5).pvalue) if n else 1.0


def paired_ratio_interval(cells: tuple[int, int, int, int], resamples: int = 10_000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy(a) / accuracy(b) from ``paired_cells``, resampling
    the validation images with replacement, the same resample for both models.

    The ratio of a resample depends only on how many of its images fall in each of the four cells,
    and drawing n images with replacement puts Multinomial(n, cell shares) images in them: drawing
    those four counts is the image resample itself, at any n. NaN where b got nothing right.
    """
    cells = np.asarray(cells, dtype=np.int64)
    n = int(cells.sum())
    if n == 0 or cells[0] + cells[2] == 0:
        return (math.nan, math.nan)
    counts = np.random.default_rng(seed).multinomial(n, cells / n, size=resamples)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (counts[:, 0] + counts[:, 1]) / (counts[:, 0] + counts[:, 2])
    tail = (1 - level) / 2
    lo, hi = np.nanquantile(ratio, [tail, 1 - tail])
    return (float(lo), float(hi))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits, shifted by each row's maximum so large logits cannot overflow."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def validation_figures(probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """An epoch's validation loss and accuracy from predicted probabilities ``probs`` (one row
    per image) and labels ``y``: mean cross-entropy (a zero probability counts as 1e-12) and
    top-1. Every engine scores its epochs with this, so their curves compare."""
    picked = np.clip(probs[np.arange(len(y)), y], 1e-12, None)
    return float(-np.log(picked).mean()), float((probs.argmax(1) == y).mean())


def epoch_record(epoch: int, train_loss: float, train_acc: float, val_probs: np.ndarray | None, val_y: np.ndarray,
                 epoch_time: float, seen: int) -> dict:
    """One epoch's figures (``epoch`` 0-based), the same keys for every engine; the validation
    ones are None after an epoch that was not validated."""
    val_loss, val_acc = validation_figures(val_probs, val_y) if val_probs is not None else (None, None)
    return {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss,
            "val_accuracy": val_acc, "epoch_time_s": epoch_time, "images_per_s": seen / epoch_time}


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Top-1 (with 95% CI), top-5, macro-F1, per-class accuracy, the confusion matrix, the chance
    level (the largest class's share) with whether top-1 is distinguishable from it, and each
    validation image's predicted and true class (``val_pred``, ``val_true``, in the order of
    ``y_true``): the comparison tests models against each other on the same images with them."""
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
        "val_pred": pred.tolist(),
        "val_true": np.asarray(y_true).tolist(),
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
