"""--repeats beyond the local PyTorch run: every repeat a Ray task of its own (and resumed under
Ray), Keras models seeded per repeat, one comparison pooling PyTorch and Keras repeats, and a run
whose every repeat failed."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from bakeoff.api import run_comparison
from bakeoff.store import Store
from conftest import make_colour_folder

SETTINGS = dict(epochs=1, lr=0.002, batch_size=16, image_size=32, pretrained=False, progress=False, device="cpu")
TORCH_MODEL = "timm/test_resnet"
# Keras's MobileNet (v1): fewer layers for TensorFlow to compile than the MobileNetV2 ids.
KERAS_MODEL = "keras/MobileNet"
# Figures a repeat's row copies from its stored trial.
STORED = ["accuracy", "accuracy_ci_low", "accuracy_ci_high", "top5", "macro_f1", "train_time_s", "n_val", "params"]

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs bakeoff[ray]")
needs_keras = pytest.mark.skipif(
    importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow") is None,
    reason="needs bakeoff[tensorflow]")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("repeats-engines") / "data", per_class=8)


def stored_by_repeat(out) -> dict:
    """(model, repeat) -> the stored trial of the folder's latest run."""
    _, trials = Store(out / "bakeoff.db").latest_trials()
    return {(t["model"], t["repeat"]): t for t in trials}


def snapshot(out) -> dict:
    """What a run left in ``out``, read before a later run rewrites it."""
    return {"by_repeat": pd.read_csv(out / "results_by_repeat.csv"), "results": pd.read_csv(out / "results.csv"),
            "trials": stored_by_repeat(out)}


@pytest.fixture(scope="module")
def ray_runs(tmp_path_factory, data):
    """Two repeats as Ray tasks side by side (two at a time on a 2-CPU cluster), then the same run
    with three."""
    import ray

    out = tmp_path_factory.mktemp("ray-repeats") / "out"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BAKEOFF_RAY_CPUS_PER_TRIAL", "1")
        try:
            two = run_comparison(data, [TORCH_MODEL], out=out, executor="ray", repeats=2, **SETTINGS)
            after_two = snapshot(out)
            three = run_comparison(data, [TORCH_MODEL], out=out, executor="ray", repeats=3, **SETTINGS)
        finally:
            ray.shutdown()
    return out, two, after_two, three, snapshot(out)


@needs_ray
def test_ray_trains_every_repeat_with_its_seed_and_pools_them(ray_runs):
    out, two, after, _, _ = ray_runs
    assert two.run["counts"] == {"trained": 2, "resumed": 0, "failed": 0}
    by_repeat, results, trials = after["by_repeat"], after["results"].set_index("model"), after["trials"]
    assert by_repeat[["model", "repeat", "seed", "status"]].values.tolist() == [[TORCH_MODEL, 0, 0, "ok"],
                                                                                 [TORCH_MODEL, 1, 1, "ok"]]
    for _, row in by_repeat.iterrows():  # each repeat's row: its stored trial's figures
        stored = trials[(row["model"], row["repeat"])]
        for column in STORED:
            assert row[column] == pytest.approx(stored["result"][column], rel=1e-12), (row["repeat"], column)
    assert results["repeats"].tolist() == [2]
    assert results.loc[TORCH_MODEL, "accuracy"] == pytest.approx(by_repeat["accuracy"].mean())
    zero, one = trials[(TORCH_MODEL, 0)]["result"], trials[(TORCH_MODEL, 1)]["result"]
    assert zero["val_true"] == one["val_true"]  # one split for every repeat
    assert zero["history"][0]["train_loss"] != one["history"][0]["train_loss"]  # another draw of training
    # each repeat's model is its own, in its own folder, saved with its own seed
    assert zero["model_dir"].startswith("models/") and one["model_dir"].startswith("repeats/seed-1/models/")
    for r, result in ((0, zero), (1, one)):
        assert json.loads((out / result["model_dir"] / "protocol.json").read_text())["seed"] == r


@needs_ray
def test_ray_resumes_a_run_with_more_repeats_training_only_the_new_ones(ray_runs):
    out, _, before, three, after = ray_runs
    assert three.run["counts"] == {"trained": 1, "resumed": 2, "failed": 0}
    assert after["by_repeat"]["seed"].tolist() == [0, 1, 2] and after["results"]["repeats"].tolist() == [3]
    for key, trial in before["trials"].items():  # the first two repeats' trials, not trained again
        again = after["trials"][key]
        assert (again["key"], again["finished"], again["result"]) == (trial["key"], trial["finished"], trial["result"])
    third = after["trials"][(TORCH_MODEL, 2)]["result"]
    assert third["model_dir"].startswith("repeats/seed-2/models/")
    assert json.loads((out / third["model_dir"] / "protocol.json").read_text())["seed"] == 2
    assert third["history"][0]["train_loss"] not in [t["result"]["history"][0]["train_loss"]
                                                      for t in before["trials"].values()]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, data):
    """A PyTorch and a Keras model, two repeats each."""
    out = tmp_path_factory.mktemp("mixed-repeats") / "out"
    comparison = run_comparison(data, [TORCH_MODEL, KERAS_MODEL], out=out, repeats=2, **SETTINGS)
    return out, comparison


@needs_keras
def test_keras_repeats_train_with_their_seeds_on_one_split(mixed_run):
    out, comparison = mixed_run
    assert comparison.run["counts"] == {"trained": 4, "resumed": 0, "failed": 0}
    trials = stored_by_repeat(out)
    zero, one = trials[(KERAS_MODEL, 0)]["result"], trials[(KERAS_MODEL, 1)]["result"]
    assert zero["framework"] == "tensorflow" and zero["backend"] == "tensorflow"
    assert zero["val_true"] == one["val_true"]  # the same validation images, in the same order
    # another initialisation and batch order: another first epoch, other validation probabilities
    assert zero["history"][0]["train_loss"] != one["history"][0]["train_loss"]
    assert zero["history"][0]["val_loss"] != one["history"][0]["val_loss"]
    assert one["model_dir"].startswith("repeats/seed-1/models/") and zero["model_dir"].startswith("models/")
    for r, result in ((0, zero), (1, one)):
        folder = out / result["model_dir"]
        assert (folder / "model.keras").is_file()
        assert json.loads((folder / "protocol.json").read_text())["seed"] == r


@needs_keras
def test_a_mixed_run_pools_both_frameworks_repeats_and_ranks_them(mixed_run):
    out, _ = mixed_run
    by_repeat = pd.read_csv(out / "results_by_repeat.csv")
    results = pd.read_csv(out / "results.csv").set_index("model")
    trials = stored_by_repeat(out)
    assert results.loc[KERAS_MODEL, "framework"] == "tensorflow"
    assert results.loc[TORCH_MODEL, "framework"] == "pytorch"
    for model in (TORCH_MODEL, KERAS_MODEL):
        rows = by_repeat[by_repeat["model"] == model].set_index("repeat")
        assert rows["seed"].to_dict() == {0: 0, 1: 1} and set(rows["status"]) == {"ok"}
        accuracies = [trials[(model, r)]["result"]["accuracy"] for r in (0, 1)]
        assert rows["accuracy"].tolist() == pytest.approx(accuracies)
        assert results.loc[model, "repeats"] == 2
        assert results.loc[model, "accuracy"] == pytest.approx(np.mean(accuracies))
        assert results.loc[model, "accuracy_sd"] == pytest.approx(np.std(accuracies, ddof=1))
        assert results.loc[model, "accuracy_ci_low"] <= results.loc[model, "accuracy_ci_high"]
    # the paired figures need one split: every trial of either framework scored the same images
    assert len({tuple(t["result"]["val_true"]) for t in trials.values()}) == 1
    assert results["p_best"].sum() == pytest.approx(1.0)
    figures = json.loads((out / "stability.json").read_text())
    assert figures["repeats"] == 2 and sorted(figures["models"]) == sorted([TORCH_MODEL, KERAS_MODEL])
    assert figures["left_out"] == [] and "held in" in figures["verdict"]


def test_a_run_whose_every_repeat_failed_still_writes_its_rows(tmp_path):
    """Every trial failed (a model that does not build, an engine that is not installed): the
    repeats' failed rows and one failed pooled row per model, not a crash while writing them."""
    from bakeoff.compare.outputs import write_outputs

    out = tmp_path / "out"
    out.mkdir()
    store = Store(out / "bakeoff.db")
    keys = {m: [f"{m}-{r}" for r in range(2)] for m in ("a", "b")}
    run_id = store.start_run("bakeoff run", None, {m: k[0] for m, k in keys.items()}, {"seed": 0}, {}, {},
                             repeat_keys=keys)
    for model, model_keys in keys.items():
        for key in model_keys:
            store.save_trial(key, run_id, model, "tensorflow", "failed", 0.0, error=f"ValueError: {key} did not build")
    store.finish_run(run_id, "finished")
    comparison = write_outputs(out)
    results = pd.read_csv(out / "results.csv").set_index("model")
    assert results["status"].tolist() == ["failed", "failed"] and results["repeats"].tolist() == [0, 0]
    assert results["accuracy_sd"].isna().all() and results["p_best"].isna().all()
    assert results.loc["a", "error"] == "2 of 2 repeats did not finish (failed, failed): ValueError: a-0 did not build"
    by_repeat = pd.read_csv(out / "results_by_repeat.csv")
    assert by_repeat[["model", "seed", "status"]].values.tolist() == [
        ["a", 0, "failed"], ["a", 1, "failed"], ["b", 0, "failed"], ["b", 1, "failed"]]
    assert "no model finished successfully" in comparison.warning and not (out / "stability.json").exists()
