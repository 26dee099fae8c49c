"""--repeats: every repeat a trial of its own, pooled figures checked against hand-computed cases,
resume trains only the missing repeats."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau

from bakeoff.api import run_comparison
from bakeoff.compare.repeats import BY_REPEAT_COLUMNS, pool_repeats, stability
from bakeoff.compare.tables import PER_IMAGE_COLUMNS, relative_frame
from bakeoff.measure import rank_stability, repeats_interval, resampled_paired
from bakeoff.store import Store
from conftest import CORRECT, TINY



def by_repeat_rows(accuracies: dict, train_times: dict, correct: dict | None = None) -> pd.DataFrame:
    """A hand-made results_by_repeat frame: each model's accuracy and training time per repeat
    (None: the repeat failed)."""
    rows = []
    for model, accs in accuracies.items():
        for r, acc in enumerate(accs):
            row = {c: None for c in BY_REPEAT_COLUMNS + PER_IMAGE_COLUMNS}
            row.update({"model": model, "repeat": r, "seed": r, "framework": "pytorch",
                        "status": "ok" if acc is not None else "failed", "accuracy": acc,
                        "train_time_s": train_times[model][r], "params": 1000, "n_val": 4,
                        "error": None if acc is not None else "RuntimeError: boom"})
            if correct and acc is not None:
                row["val_true"] = np.zeros(4, dtype=np.int64)
                row["val_pred"] = np.where(correct[model][r] == 1, 0, 1)
            rows.append(row)
    return pd.DataFrame(rows)


def test_pooled_row_is_the_mean_sd_and_median_over_the_finished_repeats():
    rows = by_repeat_rows({"a": [0.75, 0.5, 1.0], "b": [0.5, None, 0.25]},
                          {"a": [10.0, 30.0, 20.0], "b": [5.0, 99.0, 7.0]},
                          {"a": CORRECT, "b": np.array([[1, 1, 0, 0], [0] * 4, [1, 0, 0, 0]], dtype=float)})
    pooled = pool_repeats(rows, ["a", "b"], resamples=500).set_index("model")
    assert pooled.loc["a", "accuracy"] == pytest.approx(0.75)
    assert pooled.loc["a", "accuracy_sd"] == pytest.approx(0.25)
    assert pooled.loc["a", "train_time_s"] == 20.0
    assert pooled.loc["a", "repeats"] == 3 and pooled.loc["a", "params"] == 1000
    assert (pooled.loc["a", "accuracy_ci_low"], pooled.loc["a", "accuracy_ci_high"]) == \
        pytest.approx(repeats_interval(CORRECT))
    # b's second repeat failed: its own row, left out of b's figures, said in b's error
    assert pooled.loc["b", "status"] == "ok" and pooled.loc["b", "repeats"] == 2
    assert pooled.loc["b", "accuracy"] == pytest.approx(0.375) and pooled.loc["b", "train_time_s"] == 6.0
    assert pooled.loc["b", "accuracy_sd"] == pytest.approx(math.sqrt(0.03125))
    assert "1 of 3 repeats did not finish" in pooled.loc["b", "error"] and "boom" in pooled.loc["b", "error"]
    assert math.isnan(pooled.loc["b", "accuracy_by_repeat"][1])
    assert pooled["p_best"].sum() == pytest.approx(1.0)
    assert pooled.loc["a", "p_best"] > 0.9  # a is right at least as often in every repeat and on every image


def test_rank_stability_against_scipy_and_a_hand_counted_ranking():
    # four models, three repeats: repeat 1 swaps the first two, repeat 2 the last two
    acc = np.array([[0.9, 0.8, 0.9], [0.8, 0.9, 0.8], [0.7, 0.7, 0.6], [0.6, 0.6, 0.7]])
    figures = rank_stability(acc)
    by_scipy = [kendalltau(acc[:, i], acc[:, j]).statistic for i, j in ((0, 1), (0, 2), (1, 2))]
    assert figures["kendall_tau"] == pytest.approx(by_scipy)
    assert figures["kendall_tau"] == pytest.approx([4 / 6, 4 / 6, 2 / 6])  # one, one and two of six pairs swapped
    assert figures["kendall_tau_mean"] == pytest.approx(5 / 9) and figures["kendall_tau_min"] == pytest.approx(1 / 3)
    # top 3 by mean accuracy: models 0, 1, 2; only repeat 0 keeps them in that order above model 3
    assert figures["top"] == 3 and figures["top_order"] == [0, 1, 2] and figures["top_held"] == 1
    results = pd.DataFrame({"model": list("abcd"), "status": "ok", "accuracy_by_repeat": [list(r) for r in acc]})
    verdict = stability(results)["verdict"]
    assert verdict.startswith("the ranking of the top 3 (a, b, c) held in 1 of 3 repeats")
    assert "mean 0.56, minimum 0.33" in verdict


def test_the_relative_figures_of_pooled_rows_pair_the_repeats():
    a, b = CORRECT, np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=float)
    rows = by_repeat_rows({"a": [0.75, 0.5, 1.0], "b": [0.5, 0.25, 0.75]},
                          {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}, {"a": a, "b": b})
    pooled = pool_repeats(rows, ["a", "b"], resamples=1000)
    pooled["latency_ms_p50"] = 1.0
    rel, _ = relative_frame(pooled, "b")
    rel = rel.set_index("model")
    resampled = np.stack(pooled["accuracy_resamples"].to_list(), axis=1)
    p, lo, hi = resampled_paired(resampled[:, 0], resampled[:, 1])
    assert rel.loc["a", "p_vs_baseline"] == p and (rel.loc["a", "relative_accuracy_ci_low"], 
                                                   rel.loc["a", "relative_accuracy_ci_high"]) == (lo, hi)
    assert rel.loc["a", "relative_accuracy"] == pytest.approx(0.75 / 0.5)
    assert rel.loc["a", "relative_accuracy_by_repeat"] == pytest.approx([1.5, 1.0, 2.0])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, shared_colour_folder):
    """One repeat, then the same run with two: the second trains only the second repeat."""
    out = tmp_path_factory.mktemp("repeats") / "out"
    models = ["timm/test_resnet", "timm/test_efficientnet"]
    first = run_comparison(shared_colour_folder, models, out=out, **(TINY | {"epochs": 1}))
    single = pd.read_csv(out / "results.csv")
    assert not (out / "results_by_repeat.csv").exists() and not (out / "stability.json").exists()
    second = run_comparison(shared_colour_folder, models, out=out, repeats=2, **(TINY | {"epochs": 1}))
    return out, first, single, second


def test_a_run_with_repeats_resumes_the_first_and_trains_only_the_others(two_runs):
    out, first, single, second = two_runs
    assert first.run["counts"] == {"trained": 2, "resumed": 0, "failed": 0}
    assert second.run["counts"] == {"trained": 2, "resumed": 2, "failed": 0}
    assert "repeats" not in single.columns


def test_results_by_repeat_has_a_row_per_repeat_and_results_pool_them(two_runs):
    out, _, single, _ = two_runs
    by_repeat = pd.read_csv(out / "results_by_repeat.csv")
    assert by_repeat.groupby("model").size().to_dict() == {"timm/test_efficientnet": 2, "timm/test_resnet": 2}
    assert sorted(by_repeat["seed"]) == [0, 0, 1, 1] and set(by_repeat["status"]) == {"ok"}
    results = pd.read_csv(out / "results.csv").set_index("model")
    assert results["repeats"].tolist() == [2, 2]
    for model, rows in by_repeat.groupby("model"):
        assert results.loc[model, "accuracy"] == pytest.approx(rows["accuracy"].mean())
        assert results.loc[model, "accuracy_sd"] == pytest.approx(rows["accuracy"].std(ddof=1), nan_ok=True)
        assert results.loc[model, "train_time_s"] == pytest.approx(rows["train_time_s"].median())
    # the first repeat is the single run's trial, stored once
    first = by_repeat[by_repeat["repeat"] == 0].set_index("model")
    assert first.loc[single["model"], "accuracy"].tolist() == single["accuracy"].tolist()
    assert results["p_best"].sum() == pytest.approx(1.0)
    figures = json.loads((out / "stability.json").read_text())
    assert figures["repeats"] == 2 and "held in" in figures["verdict"]
    assert "Rank stability" in (out / "report.md").read_text()


def test_each_repeat_trains_with_its_seed_on_the_same_split(two_runs):
    out, _, _, _ = two_runs
    _, trials = Store(out / "bakeoff.db").latest_trials()
    by = {(t["model"], t["repeat"]): t["result"] for t in trials}
    for model in ("timm/test_resnet", "timm/test_efficientnet"):
        zero, one = by[(model, 0)], by[(model, 1)]
        assert zero["val_true"] == one["val_true"]  # the same validation images, in the same order
        assert zero["history"][0]["train_loss"] != one["history"][0]["train_loss"]  # another draw of training
        assert one["model_dir"].startswith("repeats/seed-1/models/") and (out / one["model_dir"]).is_dir()
        assert (out / zero["model_dir"]).is_dir() and zero["model_dir"].startswith("models/")


def test_the_report_draws_each_repeats_training_curve(two_runs):
    import importlib.util
    import re

    if importlib.util.find_spec("plotly") is None:
        pytest.skip("report.html needs bakeoff[report]")
    out, _, _, _ = two_runs
    page = (out / "report.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="bakeoff-data">(.*?)</script>', page, re.S)[1])
    _, trials = Store(out / "bakeoff.db").latest_trials()
    history = {(t["model"], t["repeat"]): t["result"]["history"] for t in trials}
    for i, model in enumerate(pd.read_csv(out / "results.csv")["model"]):
        traces = data["models"][f"m{i}"]["curves"]["data"]
        faint = [t for t in traces if t.get("opacity")]
        solid = [t for t in traces if not t.get("opacity")]
        assert len(faint) == len(solid) == 4  # loss and accuracy, training and validation, per repeat
        assert faint[0]["y"] == [h["train_loss"] for h in history[(model, 1)]]
        assert solid[0]["y"] == [h["train_loss"] for h in history[(model, 0)]]
        assert faint[3]["y"] == [h["val_accuracy"] for h in history[(model, 1)]]
