"""Relative figures, Pareto flags and plots on hand-made results."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bakeoff.compare.plots import plot_tradeoffs
from bakeoff.compare.tables import at_chance, chance_warning, pareto_mask, relative_frame
from bakeoff.errors import BakeoffError


def _results() -> pd.DataFrame:
    rows = [  # model, framework, status, accuracy, train s, latency ms
        ("base", "pytorch", "ok", 0.80, 100.0, 10.0),
        ("fast", "pytorch", "ok", 0.70, 20.0, 2.0),    # cheapest: on both fronts
        ("best", "tensorflow", "ok", 0.95, 300.0, 30.0),  # most accurate: on both fronts
        ("worse", "pytorch", "ok", 0.75, 150.0, 12.0),  # dominated by base on both
        ("mixed", "tensorflow", "ok", 0.78, 400.0, 5.0),  # slow to train, fast to infer
        ("broken", "pytorch", "failed", None, None, None),
    ]
    df = pd.DataFrame(rows, columns=["model", "framework", "status", "accuracy", "train_time_s", "latency_ms_p50"])
    df["accuracy_ci_low"] = df["accuracy"] - 0.02
    df["accuracy_ci_high"] = df["accuracy"] + 0.02
    return df


def test_pareto_mask_on_a_hand_made_example():
    acc = np.array([0.8, 0.7, 0.95, 0.75, 0.8])
    cost = np.array([10, 2, 30, 12, 10])
    # index 4 ties index 0 exactly: neither dominates the other
    assert pareto_mask(acc, cost).tolist() == [True, True, True, False, True]


def test_relative_to_baseline_and_pareto_flags():
    rel, base = relative_frame(_results(), "base")
    assert base == "base"
    row = rel.set_index("model").loc["base"]
    assert row["relative_accuracy"] == 1.0 and row["relative_training_time"] == 1.0
    assert row["relative_inference_time"] == 1.0 and row["baseline"]
    r = rel.set_index("model")
    assert r.loc["best", "relative_accuracy"] == pytest.approx(0.95 / 0.80)
    assert r.loc["fast", "relative_training_time"] == pytest.approx(0.2)
    assert "broken" not in r.index
    assert r["pareto_training"].to_dict() == {"base": True, "fast": True, "best": True, "worse": False,
                                              "mixed": False}
    assert r["pareto_inference"].to_dict() == {"base": True, "fast": True, "best": True, "worse": False,
                                               "mixed": True}
    assert r["pareto"].to_dict() == {"base": True, "fast": True, "best": True, "worse": False, "mixed": True}


def test_default_baseline_is_first_successful_and_failed_baseline_is_refused():
    _, base = relative_frame(_results())
    assert base == "base"
    with pytest.raises(BakeoffError, match="no successful trial"):
        relative_frame(_results(), "broken")
    with pytest.raises(BakeoffError, match="not a model of this run"):
        relative_frame(_results(), "nope")


def test_plots_are_written(tmp_path):
    rel, _ = relative_frame(_results(), "base")
    paths = plot_tradeoffs(rel, tmp_path)
    assert [p.name for p in paths] == ["accuracy_vs_training_time.png", "accuracy_vs_inference_time.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_a_model_at_chance_is_on_no_front_and_not_the_default_baseline():
    df = _results().assign(chance_accuracy=0.1, above_chance=True)
    collapsed = {"model": "collapsed", "framework": "pytorch", "status": "ok", "accuracy": 0.10,
                 "train_time_s": 1.0, "latency_ms_p50": 0.5, "accuracy_ci_low": 0.09, "accuracy_ci_high": 0.11,
                 "chance_accuracy": 0.1, "above_chance": False}
    df = pd.concat([pd.DataFrame([collapsed]), df], ignore_index=True)  # listed first, cheapest of all
    assert at_chance(df).tolist() == [True, False, False, False, False, False, False]
    rel, base = relative_frame(df)
    assert base == "base"  # the first model that learned
    r = rel.set_index("model")
    assert bool(r.loc["collapsed", "at_chance"]) and not r.loc["collapsed", "pareto"]
    assert r["pareto_training"].drop("collapsed").to_dict() == {"base": True, "fast": True, "best": True,
                                                                "worse": False, "mixed": False}
    # without the check the collapsed model, cheapest of all, would sit on both fronts
    unchecked = relative_frame(df.assign(above_chance=True))[0].set_index("model")
    assert unchecked.loc["collapsed", "pareto_training"] and unchecked.loc["collapsed", "pareto_inference"]
    assert relative_frame(df, "collapsed")[1] == "collapsed"  # asked for by name: still allowed
    warning = chance_warning(df)
    assert warning.startswith("collapsed 10.0% (95% CI 9.0–11.0%), chance 10.0%: not clearly above chance")
    assert "left out of the Pareto front and the recommendations" in warning and "--lr" in warning
    assert chance_warning(df.assign(above_chance=True)) is None and chance_warning(_results()) is None
