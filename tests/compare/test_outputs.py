"""A run's written outputs from a store of hand-made trials: starting weights, paired p-values,
a failed baseline's stand-in and the data set's warnings in results.csv, relative.csv and both reports."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bakeoff.compare.outputs import write_outputs
from bakeoff.errors import BakeoffError
from bakeoff.store import Store


def _store_with_trials(folder, trials: dict, baseline=None, dataset=None):
    """A store holding one finished run of hand-made trials (model -> result dict, or an error)."""
    store = Store(folder / "bakeoff.db")
    keys = {model: f"k{i}" for i, model in enumerate(trials)}
    ds = {"classes": ["a", "b"], "n_train": 10, "n_val": 200, "val_counts": {"a": 100, "b": 100}} | (dataset or {})
    run_id = store.start_run("bakeoff run data", baseline, keys, {"epochs": 1}, ds, {"device": "cpu"})
    for model, result in trials.items():
        if isinstance(result, str):
            store.save_trial(keys[model], run_id, model, "pytorch", "failed", 0.0, error=result)
        else:
            store.save_trial(keys[model], run_id, model, "pytorch", "ok", 0.0, result=result)
    store.finish_run(run_id, "finished")


def _trial(correct: np.ndarray, weights: str, train_s: float) -> dict:
    """A finished trial's stored result, two balanced classes, per-image answers included."""
    true = np.arange(len(correct)) % 2
    pred = np.where(correct, true, 1 - true)
    cm = [[int(np.sum((true == i) & (pred == j))) for j in range(2)] for i in range(2)]
    acc = float(correct.mean())
    return {"accuracy": acc, "accuracy_ci_low": acc - 0.05, "accuracy_ci_high": acc + 0.05, "train_time_s": train_s,
            "latency_ms_p50": train_s / 10, "latency_ms_p95": train_s / 8, "throughput_img_s": 100.0, "top5": 1.0,
            "macro_f1": acc, "params": 1000, "size_mb": 1.0, "confusion_matrix": cm, "weights": weights,
            "val_pred": pred.tolist(), "val_true": true.tolist(), "n_val": len(correct)}


def test_outputs_carry_weights_and_p_and_fall_back_from_a_failed_baseline(tmp_path):
    rng = np.random.default_rng(0)
    good = rng.random(200) < 0.9
    _store_with_trials(tmp_path, {
        "wanted": "RuntimeError: out of memory",
        "pre": _trial(good, "imagenet (timm hub)", 10.0),
        "rand": _trial(good & (rng.random(200) < 0.8), "random-init", 5.0),
        "file": _trial(good | (rng.random(200) < 0.5), "imagenet (file w.pth)", 20.0),
    }, baseline="wanted", dataset={"warnings": ["class b: 1 training image"]})
    comparison = write_outputs(tmp_path, plots=False)
    assert comparison.baseline == "file"  # the most accurate, in place of the failed one
    rel = pd.read_csv(tmp_path / "relative.csv").set_index("model")
    assert rel["weights"].to_dict() == {"pre": "imagenet", "rand": "random-init", "file": "file"}
    assert rel.loc["file", "p_vs_baseline"] == 1.0 and rel.loc["file", "baseline"]
    assert rel.loc["pre", "p_vs_baseline"] < 1 and rel.loc["pre", "relative_accuracy_ci_high"] <= 1.0
    res = pd.read_csv(tmp_path / "results.csv").set_index("model")
    assert res["p_vs_baseline"].drop("wanted").tolist() == rel["p_vs_baseline"].tolist()
    assert not {"val_pred", "val_true"} & set(res.columns)
    assert "baseline wanted: its trial failed; compared against file" in comparison.warning
    assert "1 model started from random weights (rand)" in comparison.warning
    md = (tmp_path / "report.md").read_text()
    assert "baseline wanted: its trial failed" in md and "data set warning: class b: 1 training image" in md
    assert "| weights |" in md and "| p vs baseline |" in md
    assert "| pre | pytorch | ok | imagenet |" in md and "| rand | pytorch | ok | random-init |" in md
    page = (tmp_path / "report.html").read_text()
    assert "baseline wanted: its trial failed" in page and "class b: 1 training image" in page
    # an explicit baseline that is no model of the run is still refused
    with pytest.raises(BakeoffError, match="--baseline nope is not a model of this run"):
        write_outputs(tmp_path, "nope", plots=False)
