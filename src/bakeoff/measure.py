"""Measurements: accuracy metrics with intervals, and honest latency/throughput timing."""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

__all__ = ["classification_metrics", "wilson_interval", "chance_level", "chance_p", "paired_cells", "mcnemar_p",
           "paired_ratio_interval", "epoch_record", "ALPHA", "time_calls", "summarize_ms", "softmax",
           "repeats_interval", "repeat_resamples", "resampled_paired", "share_best", "rank_stability"]


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


def repeats_interval(correct, level: float = 0.95) -> tuple[float, float]:
    """Interval of the mean accuracy over repeats, from ``correct`` (repeats x validation images,
    1 where right), the images the same in every repeat.

    Its variance adds the two things another run would draw afresh: the seed (the sample variance
    of the repeats' accuracies over R) and the validation images (the sample variance over images
    of each image's share of right answers across the repeats, over n). The interval is Student's
    t with Welch-Satterthwaite degrees of freedom, so three repeats get a wide one. The images'
    part carries the seed-by-image interaction a second time: it errs on the wide side. One
    repeat: the Wilson interval of that trial."""
    from scipy.stats import t

    c = np.asarray(correct, dtype=float)
    r, n = c.shape
    if r == 1:
        return wilson_interval(int(c.sum()), n)
    mean = float(c.mean())
    parts = np.array([c.mean(1).var(ddof=1) / r, c.mean(0).var(ddof=1) / n if n > 1 else 0.0])
    total = float(parts.sum())
    if total == 0:
        return (mean, mean)
    df = total ** 2 / sum(v ** 2 / d for v, d in zip(parts, (r - 1, n - 1)) if v > 0)
    half = float(t.ppf(0.5 + level / 2, df)) * math.sqrt(total)
    return (max(0.0, mean - half), min(1.0, mean + half))


def repeat_resamples(correct, resamples: int = 2000, seed: int = 0, chunk: int = 200) -> np.ndarray:
    """Each model's accuracy in ``resamples`` joint bootstrap resamples (resamples x models) from
    ``correct`` (models x repeats x validation images, 1 where right; a NaN row: a repeat that did
    not finish).

    One resample draws R repeat numbers and n images with replacement, the same draw for every
    model: model a's repeat r stays paired with model b's repeat r on the same images. A model's
    accuracy in it is the mean over the drawn repeats it finished (NaN where it finished none)."""
    c = np.asarray(correct, dtype=float)
    m, r, n = c.shape
    finished = ~np.isnan(c).any(axis=2)  # models x repeats
    flat = np.nan_to_num(c).reshape(m * r, n).T  # images x (model, repeat)
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, m))
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        images = rng.multinomial(n, np.full(n, 1 / n), size=b)  # times each image is drawn
        per_repeat = (images @ flat).reshape(b, m, r) / n
        drawn = np.stack([np.bincount(row, minlength=r) for row in rng.integers(0, r, size=(b, r))])
        weight = drawn[:, None, :] * finished[None]  # b x models x repeats
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + b] = (per_repeat * weight).sum(2) / weight.sum(2)
    return out


def resampled_paired(a, b, level: float = 0.95) -> tuple[float, float, float]:
    """Two-sided p-value of "a and b are equally accurate" and the percentile interval of
    accuracy(a) / accuracy(b), from the same resamples of both (``repeat_resamples``' columns).

    p is twice the share of resamples on the far side of no difference (ties count on both
    sides), with one added to count and total so it is never 0; NaN where nothing pairs."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    both = ~(np.isnan(a) | np.isnan(b))
    a, b = a[both], b[both]
    if not len(a):
        return (math.nan, math.nan, math.nan)
    d = a - b
    p = min(1.0, (2 * min(int((d <= 0).sum()), int((d >= 0).sum())) + 1) / (len(d) + 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(b > 0, a / b, np.nan)
    if np.isnan(ratio).all():
        return (p, math.nan, math.nan)
    tail = (1 - level) / 2
    lo, hi = np.nanquantile(ratio, [tail, 1 - tail])
    return (p, float(lo), float(hi))


def share_best(resampled) -> np.ndarray:
    """Share of resamples (rows of ``repeat_resamples``) in which each model (column) is the most
    accurate; a tie splits its resample among the tied models; NaN never wins."""
    acc = np.asarray(resampled, dtype=float)
    filled = np.where(np.isnan(acc), -np.inf, acc)
    top = (filled == filled.max(axis=1, keepdims=True)) & ~np.isnan(acc)
    tied = top.sum(axis=1)
    counted = tied > 0
    if not counted.any():
        return np.full(acc.shape[1], math.nan)
    return (top[counted] / tied[counted, None]).sum(axis=0) / counted.sum()


def rank_stability(accuracy, top: int = 3) -> dict:
    """How far the repeats agree on the ranking, from ``accuracy`` (models x repeats, every model
    finished in every repeat): Kendall's tau (tau-b, ties allowed) between each pair of repeats'
    accuracies, its mean and minimum, and in how many repeats the ``top`` models by mean accuracy
    came out in that order above all others (a tie does not break it)."""
    from scipy.stats import kendalltau

    acc = np.asarray(accuracy, dtype=float)
    m, r = acc.shape
    taus = []
    for i in range(r):
        for j in range(i + 1, r):
            with np.errstate(invalid="ignore", divide="ignore"):
                taus.append(float(kendalltau(acc[:, i], acc[:, j])[0]))  # NaN where a repeat tied all models
    known = [t for t in taus if not math.isnan(t)]
    order = np.argsort(-acc.mean(axis=1), kind="stable")
    k = min(top, m)
    lead, rest = order[:k], order[k:]
    held = sum(bool(np.all(np.diff(acc[lead, j]) <= 0) and (not len(rest) or acc[lead[-1], j] >= acc[rest, j].max()))
               for j in range(r))
    return {"kendall_tau": taus, "kendall_tau_mean": float(np.mean(known)) if known else None,
            "kendall_tau_min": float(min(known)) if known else None, "top": k, "top_order": order[:k].tolist(),
            "top_held": int(held), "repeats": r}


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
