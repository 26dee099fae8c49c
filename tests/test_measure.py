"""Metrics and timing helpers, and the statistics of repeats checked against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bakeoff.measure import (chance_level, chance_p, classification_metrics, mcnemar_p, paired_cells,
                             paired_ratio_interval, repeat_resamples, repeats_interval, resampled_paired, share_best,
                             summarize_ms, time_calls, validation_figures, wilson_interval)
from conftest import CORRECT


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(81, 100)
    assert lo == pytest.approx(0.7222, abs=1e-3) and hi == pytest.approx(0.8749, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-3)


def test_classification_metrics_values():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.9, .05, .05], [.2, .7, .1], [.1, .8, .1], [.1, .8, .1], [.3, .3, .4], [.5, .1, .4]])
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.5}
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["top5"] == 1.0 and m["accuracy_ci_low"] < 4 / 6 < m["accuracy_ci_high"]
    assert 0 < m["macro_f1"] < 1
    # each image's answer and label, in order, as plain ints (the stored result is JSON)
    assert m["val_pred"] == [0, 1, 1, 1, 2, 0] and m["val_true"] == [0, 0, 1, 1, 2, 2]
    assert all(type(v) is int for v in m["val_pred"] + m["val_true"])


def test_a_model_that_answers_one_class_is_at_chance():
    y = np.repeat(np.arange(10), 100)  # balanced: chance is 10%
    collapsed = np.tile(np.eye(10)[3], (1000, 1))  # always class 3
    m = classification_metrics(y, collapsed, list("abcdefghij"))
    assert m["accuracy"] == 0.1 and m["chance_accuracy"] == 0.1 and m["above_chance"] is False
    # imbalanced: always answering the big class scores 80%, which is chance here, not skill
    y2 = np.array([0] * 80 + [1] * 20)
    m2 = classification_metrics(y2, np.tile([0.9, 0.1], (100, 1)), ["a", "b"])
    assert m2["accuracy"] == 0.8 and m2["chance_accuracy"] == 0.8 and m2["above_chance"] is False
    # right 30% of the time on the balanced set: distinguishable from 10%
    pred = np.where(np.arange(1000) % 10 < 3, y, (y + 1) % 10)
    m3 = classification_metrics(y, np.eye(10)[pred], list("abcdefghij"))
    assert m3["accuracy"] == pytest.approx(0.3) and m3["above_chance"] is True


def test_chance_test_is_the_exact_one_sided_binomial_test():
    from scipy.stats import binomtest

    # by hand: 2 of 3 right when each is right with probability 1/3: P(X >= 2) = 3 (1/3)^2 (2/3) + (1/3)^3 = 7/27
    assert chance_p(2, 3, 1 / 3) == pytest.approx(7 / 27)
    assert chance_level([1, 1, 1], 2) == (pytest.approx(1 / 3), False)
    # all right at one half: 6 of 6 is 1/64 < 0.05, 4 of 4 is 1/16, not below it
    assert chance_p(6, 6, 0.5) == pytest.approx(1 / 64) and chance_level([3, 3], 6)[1] is True
    assert chance_p(4, 4, 0.5) == pytest.approx(1 / 16) and chance_level([2, 2], 4)[1] is False
    for correct, support in ((61, [60, 40]), (75, [60, 40]), (15, [5] * 10), (9, [5] * 10), (30, [30, 10, 10])):
        n, chance = sum(support), max(support) / sum(support)
        ref = binomtest(correct, n, chance, alternative="greater").pvalue
        assert chance_p(correct, n, chance) == pytest.approx(ref, rel=1e-12)
        assert chance_level(support, correct) == (pytest.approx(chance), ref < 0.05)
    assert chance_level([100], 100)[1] is False  # one class: always answering it is perfect, and chance


def test_mcnemar_matches_statsmodels_and_a_hand_computed_table():
    from statsmodels.stats.contingency_tables import mcnemar

    # by hand: 1 image right only for a, 6 only for b: p = 2 P(X <= 1 | 7, 1/2) = 2 (1 + 7) / 128
    assert mcnemar_p(1, 6) == pytest.approx(16 / 128) and mcnemar_p(6, 1) == pytest.approx(16 / 128)
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64) and mcnemar_p(0, 0) == 1.0
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.random(300) < rng.uniform(0.3, 0.9), rng.random(300) < rng.uniform(0.3, 0.9)
        both, only_a, only_b, neither = paired_cells(a, b)
        assert (both, only_a, only_b, neither) == (np.sum(a & b), np.sum(a & ~b), np.sum(~a & b), np.sum(~a & ~b))
        ref = mcnemar([[both, only_a], [only_b, neither]], exact=True).pvalue
        assert mcnemar_p(only_a, only_b) == pytest.approx(ref, rel=1e-9)


def test_paired_interval_equals_resampling_the_images():
    # the reference: resample the images themselves, the same indices for both models
    rng = np.random.default_rng(2)
    n = 500
    base = rng.random(n) < 0.7
    model = np.where(rng.random(n) < 0.8, base, ~base)  # agrees with the baseline on most images
    idx = np.random.default_rng(3).integers(0, n, size=(4000, n))
    ratios = model[idx].mean(1) / base[idx].mean(1)
    ref = np.percentile(ratios, [2.5, 97.5])
    lo, hi = paired_ratio_interval(paired_cells(model, base))
    assert lo == pytest.approx(ref[0], abs=0.012) and hi == pytest.approx(ref[1], abs=0.012)
    # fixed seed: the same interval every time
    assert paired_ratio_interval(paired_cells(model, base)) == (lo, hi)


def test_paired_interval_identical_predictions_and_coverage():
    same = np.arange(200) % 3 > 0
    assert paired_ratio_interval(paired_cells(same, same)) == (1.0, 1.0)
    assert mcnemar_p(*paired_cells(same, same)[1:3]) == 1.0
    assert all(np.isnan(paired_ratio_interval(paired_cells(same, np.zeros(200, bool)))))  # baseline never right
    # a known true ratio: cell probabilities (both, only model, only base, neither) = (.6, .15, .05, .2),
    # so model accuracy .75, baseline .65, ratio 75/65; a 95% interval covers it about 95% of the time
    rng = np.random.default_rng(4)
    true_ratio, hits, trials = 0.75 / 0.65, 0, 300
    for t in range(trials):
        u = rng.random(400)
        model, base = u < 0.75, (u < 0.6) | (u >= 0.75) & (u < 0.8)
        lo, hi = paired_ratio_interval(paired_cells(model, base), resamples=2000, seed=t)
        hits += lo <= true_ratio <= hi
    assert 0.90 <= hits / trials <= 0.99


def test_time_calls_syncs_each_run_and_keeps_every_sample():
    calls = []
    samples = time_calls(lambda: calls.append("f"), lambda: calls.append("s"), warmup=3, runs=50)
    assert len(samples) == 50 and calls[:4] == ["f", "f", "f", "s"] and calls.count("s") == 51
    s = summarize_ms([1.0] * 94 + [10.0] * 6)
    assert s["p50"] == 1.0 and s["p95"] == 10.0 and s["n"] == 100


def test_validation_figures_match_the_log_loss_and_accuracy_of_scikit_learn():
    from sklearn.metrics import accuracy_score, log_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 4, 50)
    loss, acc = validation_figures(probs, y)
    assert loss == pytest.approx(log_loss(y, probs, labels=range(4)), rel=1e-9)
    assert acc == accuracy_score(y, probs.argmax(1))
    # a certain wrong answer costs -log(1e-12), not infinity
    assert validation_figures(np.array([[1.0, 0.0]]), np.array([1]))[0] == pytest.approx(-np.log(1e-12))


def test_the_repeats_interval_adds_the_seed_and_the_image_variance():
    from scipy.stats import t

    # by hand: seed part = var(0.75, 0.5, 1.0) / 3 = 0.0625 / 3 = 1/48; each image's share of right
    # answers is 1, 1, 2/3, 1/3 (mean 3/4, squared deviations 9, 9, 1, 25 over 144: 44/144 over 3
    # degrees of freedom = 11/108), image part = 11/108 / 4 = 11/432; total 5/108
    seed_part, image_part = 1 / 48, 11 / 432
    df = (seed_part + image_part) ** 2 / (seed_part ** 2 / 2 + image_part ** 2 / 3)
    half = t.ppf(0.975, df) * math.sqrt(5 / 108)
    lo, hi = repeats_interval(CORRECT)
    assert lo == pytest.approx(0.75 - half) and hi == 1.0  # clipped at a perfect score
    assert 0.1 < lo < 0.3
    # one repeat falls back to the trial's own Wilson interval; identical repeats have no spread
    assert repeats_interval(CORRECT[:1]) == pytest.approx((0.3006, 0.9544), abs=1e-4)
    assert repeats_interval(np.ones((3, 5))) == (1.0, 1.0)


def test_p_best_and_the_paired_test_pool_images_and_repeats():
    # Each model is right on every image or on none within a repeat, so only the repeat draw matters:
    # a is right in repeats 0 and 1, b only in repeat 2. Drawing 3 repeats with replacement, a wins
    # when 2 or 3 draws fall on repeats 0-1: 3 (2/3)^2 (1/3) + (2/3)^3 = 20/27; b wins the other 7/27.
    a = np.array([[1] * 6, [1] * 6, [0] * 6], dtype=float)
    resampled = repeat_resamples(np.stack([a, 1 - a]), resamples=6000, seed=1)
    assert share_best(resampled) == pytest.approx([20 / 27, 7 / 27], abs=0.02)
    p, lo, hi = resampled_paired(resampled[:, 0], resampled[:, 1])
    assert p == pytest.approx(2 * 7 / 27, abs=0.03)  # twice the share on the far side of no difference
    # identical models are never distinguishable; a tie splits p_best
    same = repeat_resamples(np.stack([a, a]), resamples=200)
    assert resampled_paired(same[:, 0], same[:, 1]) == (1.0, 1.0, 1.0)
    assert share_best(same) == pytest.approx([0.5, 0.5])
    # right on every image of every repeat against wrong on all: p is the smallest 200 resamples give
    better = repeat_resamples(np.stack([np.ones((3, 6)), np.zeros((3, 6))]), resamples=200)
    assert resampled_paired(better[:, 0], better[:, 1])[0] == pytest.approx(1 / 201)
