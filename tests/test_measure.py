"""Metrics and timing helpers."""

from __future__ import annotations

import numpy as np
import pytest

from bakeoff.measure import (chance_level, classification_metrics, summarize_ms, time_calls, validation_figures,
                             wilson_interval)


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


def test_a_model_that_answers_one_class_is_at_chance():
    y = np.repeat(np.arange(10), 100)  # balanced: chance is 10%
    collapsed = np.tile(np.eye(10)[3], (1000, 1))  # always class 3
    m = classification_metrics(y, collapsed, list("abcdefghij"))
    assert m["accuracy"] == 0.1 and m["chance_accuracy"] == 0.1 and m["above_chance"] is False
    # imbalanced: always answering the big class scores 80%, which is chance here, not skill
    y2 = np.array([0] * 80 + [1] * 20)
    m2 = classification_metrics(y2, np.tile([0.9, 0.1], (100, 1)), ["a", "b"])
    assert m2["accuracy"] == 0.8 and m2["chance_accuracy"] == 0.8 and m2["above_chance"] is False
    # right 30% of the time on the balanced set: clearly above 10%
    pred = np.where(np.arange(1000) % 10 < 3, y, (y + 1) % 10)
    m3 = classification_metrics(y, np.eye(10)[pred], list("abcdefghij"))
    assert m3["accuracy"] == pytest.approx(0.3) and m3["above_chance"] is True


def test_chance_level_needs_the_interval_clear_of_chance():
    assert chance_level([5] * 10, 15) == (0.1, True)  # 30% of 50: the interval starts near 19%
    assert chance_level([1, 1, 1], 2) == (pytest.approx(1 / 3), False)  # 2 of 3 right proves nothing
    assert chance_level([60, 40], 61) == (0.6, False)
    assert chance_level([60, 40], 75) == (0.6, True)


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
