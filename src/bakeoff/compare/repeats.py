"""A run with repeats: every repeat's row (results_by_repeat.csv), one pooled row per model
(results.csv) and how far the repeats agree on the ranking (stability.json).

Each repeat is a trial of its own (``Store.latest_trials`` says which repeat it is); the pooled
figures are defined in the README's Measurements section."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bakeoff.compare.tables import PER_IMAGE_COLUMNS, RESULT_COLUMNS, results_frame
from bakeoff.measure import ALPHA, chance_p, rank_stability, repeat_resamples, repeats_interval, share_best

__all__ = ["repeats_of", "by_repeat_frame", "pool_repeats", "result_columns", "stability", "stability_verdict",
           "BY_REPEAT_COLUMNS", "REPEAT_COLUMNS"]

# results.csv adds these with repeats: after accuracy_ci_high, and p_best after p_vs_baseline
REPEAT_COLUMNS = ["repeats", "accuracy_sd", "p_best"]
BY_REPEAT_COLUMNS = ["model", "repeat", "seed"] + [c for c in RESULT_COLUMNS[1:] if c != "p_vs_baseline"]
MEAN_COLUMNS = ("accuracy", "top5", "macro_f1")  # the other figures are medians over the finished repeats
KEEP_COLUMNS = ("params", "n_val", "input_size", "concurrent_trials", "chance_accuracy")  # the same in each


def repeats_of(run: dict) -> int:
    """How many repeats the run asked for (1 for a run without)."""
    keys = run.get("repeat_keys") or {}
    return max((len(v) for v in keys.values()), default=1)


def by_repeat_frame(trials: list[dict], order: list[str], run: dict) -> pd.DataFrame:
    """One row per model and repeat (``BY_REPEAT_COLUMNS`` then the per-image columns); a repeat
    with no stored trial yet is a row with status "missing"."""
    n, seed = repeats_of(run), int(run.get("protocol", {}).get("seed", 0))
    frames = []
    for r in range(n):
        frame = results_frame([t for t in trials if t.get("repeat") == r], order).set_index("model")
        frame = frame.reindex([m for m in order])
        frame["status"] = frame["status"].fillna("missing")
        frames.append(frame.reset_index().assign(repeat=r, seed=seed + r))
    rows = pd.concat(frames, ignore_index=True)
    rows["_order"] = rows["model"].map({m: i for i, m in enumerate(order)})
    rows = rows.sort_values(["_order", "repeat"], kind="stable").drop(columns="_order").reset_index(drop=True)
    return rows[BY_REPEAT_COLUMNS + PER_IMAGE_COLUMNS]


def _correct(rows: pd.DataFrame, n_repeats: int) -> np.ndarray | None:
    """repeats x images, 1 where right, NaN rows for repeats not finished; None where a finished
    repeat lacks per-image predictions or was scored on other images."""
    ok = rows[rows["status"] == "ok"]
    truths = [np.asarray(t) if t is not None else None for t in ok["val_true"]]
    if not truths or any(t is None for t in truths) or any(p is None for p in ok["val_pred"]):
        return None
    if any(len(t) != len(truths[0]) or not np.array_equal(t, truths[0]) for t in truths):
        return None
    out = np.full((n_repeats, len(truths[0])), np.nan)
    for (_, r), truth in zip(ok.iterrows(), truths):
        out[int(r["repeat"])] = np.asarray(r["val_pred"]) == truth
    return out


def _pooled_row(rows: pd.DataFrame, n_repeats: int) -> dict:
    ok = rows[rows["status"] == "ok"]
    failed = rows[rows["status"] != "ok"]
    row = (ok if not ok.empty else rows).iloc[0].to_dict()
    for key in ("repeat", "seed"):  # a pooled row is no one repeat
        row.pop(key, None)
    acc_by_repeat = [math.nan] * n_repeats
    for _, r in ok.iterrows():
        acc_by_repeat[int(r["repeat"])] = float(r["accuracy"])
    # the per-trial pairs are left out: paired tests of pooled rows use their joint resamples;
    # accuracy_sd is set here too, so a model with no finished repeat has every column of results.csv
    row.update({"repeats": len(ok), "accuracy_by_repeat": acc_by_repeat, "val_pred": None, "val_true": None,
                "p_vs_baseline": None, "accuracy_sd": None})
    if not failed.empty:
        first = failed[failed["status"] == "failed"]
        why = f": {first['error'].iloc[0]}" if not first.empty else ""
        row["error"] = f"{len(failed)} of {n_repeats} repeats did not finish ({', '.join(failed['status'])}){why}"
    if ok.empty:
        row["status"] = "failed"
        return row
    for c in RESULT_COLUMNS:
        if c in MEAN_COLUMNS or c in KEEP_COLUMNS or c not in ok.columns:
            continue
        values = ok[c].dropna()
        if len(values) and all(isinstance(v, (int, float, np.integer, np.floating))
                               and not isinstance(v, (bool, np.bool_)) for v in values):
            row[c] = float(np.median(values.astype(float)))
    for c in MEAN_COLUMNS:
        values = pd.to_numeric(ok[c], errors="coerce").dropna()
        row[c] = float(values.mean()) if len(values) else None
    row["accuracy_sd"] = float(ok["accuracy"].astype(float).std(ddof=1)) if len(ok) > 1 else None
    correct = _correct(rows, n_repeats)
    row["val_correct"] = correct
    if correct is not None:
        row["accuracy_ci_low"], row["accuracy_ci_high"] = repeats_interval(correct[~np.isnan(correct[:, 0])])
    else:
        row["accuracy_ci_low"] = row["accuracy_ci_high"] = None
    n, chance = row.get("n_val"), row.get("chance_accuracy")
    if pd.notna(n) and n and pd.notna(chance):  # the one chance test, on the mean accuracy
        row["above_chance"] = bool(chance_p(round(row["accuracy"] * n), int(n), float(chance)) < ALPHA)
    return row


def pool_repeats(by_repeat: pd.DataFrame, order: list[str], resamples: int = 2000) -> pd.DataFrame:
    """One row per model (results.csv's columns and ``REPEAT_COLUMNS``) from ``by_repeat_frame``:
    accuracy, top-5 and macro-F1 are means over the finished repeats, every other figure their
    median; ``accuracy_ci_low/high`` is ``measure.repeats_interval``; ``p_best`` the share of
    joint resamples over images and repeats in which the model is the most accurate.

    Also carries ``accuracy_by_repeat`` (NaN: not finished) and ``accuracy_resamples`` (the
    model's accuracy in each joint resample, the same resamples for every model; None without
    per-image predictions), which ``tables.relative_frame`` pairs against the baseline."""
    n_repeats = int(by_repeat["repeat"].max()) + 1 if len(by_repeat) else 1
    # a model none of whose repeats is stored yet is left out, as results_frame leaves out a model never tried
    rows = [_pooled_row(by_repeat[by_repeat["model"] == m], n_repeats) for m in order
            if (by_repeat.loc[by_repeat["model"] == m, "status"] != "missing").any()]
    if not rows:
        return pd.DataFrame(columns=RESULT_COLUMNS + REPEAT_COLUMNS + ["accuracy_by_repeat", "accuracy_resamples"])
    frame = pd.DataFrame(rows)
    p_best, resamples_of = [None] * len(rows), [None] * len(rows)
    usable = [i for i, r in enumerate(rows) if r["status"] == "ok" and r.get("val_correct") is not None]
    usable = [i for i in usable if rows[i]["val_correct"].shape == rows[usable[0]]["val_correct"].shape]
    if usable:
        resampled = repeat_resamples(np.stack([rows[i]["val_correct"] for i in usable]), resamples)
        best = share_best(resampled)
        for j, i in enumerate(usable):
            p_best[i], resamples_of[i] = float(best[j]), resampled[:, j]
    frame["p_best"], frame["accuracy_resamples"] = p_best, resamples_of
    return frame.drop(columns=["val_correct"], errors="ignore")


def result_columns(results: pd.DataFrame) -> list[str]:
    """results.csv's columns: ``RESULT_COLUMNS``, with ``REPEAT_COLUMNS`` where the run had repeats."""
    if "repeats" not in results.columns:
        return RESULT_COLUMNS
    cols = list(RESULT_COLUMNS)
    cols[cols.index("accuracy_ci_high") + 1:cols.index("accuracy_ci_high") + 1] = ["repeats", "accuracy_sd"]
    cols.insert(cols.index("p_vs_baseline") + 1, "p_best")
    return cols


def stability(results: pd.DataFrame, top: int = 3) -> dict | None:
    """``measure.rank_stability`` over the models that finished every repeat, with their names
    and a plain-words verdict; None with fewer than two such models or two repeats."""
    ok = results[results["status"] == "ok"]
    full = [(m, a) for m, a in zip(ok["model"], ok["accuracy_by_repeat"]) if not np.isnan(a).any()]
    if len(full) < 2 or len(full[0][1]) < 2:
        return None
    figures = rank_stability(np.array([a for _, a in full]), top)
    models = [m for m, _ in full]
    figures["models"] = models
    figures["top_models"] = [models[i] for i in figures.pop("top_order")]
    figures["left_out"] = [m for m in results["model"] if m not in models]
    figures["verdict"] = stability_verdict(figures)
    return figures


def stability_verdict(figures: dict) -> str:
    """"the ranking of the top 3 held in 5 of 5 repeats (...)", and the tau figures."""
    k, n = figures["top"], figures["repeats"]
    what = f"the top {k}" if k < len(figures["models"]) else f"all {k} models"
    text = (f"the ranking of {what} ({', '.join(figures['top_models'])}) held in {figures['top_held']} of {n} "
            f"repeats")
    if figures["kendall_tau_mean"] is not None:
        text += (f"; Kendall's tau between the repeats' rankings: mean {figures['kendall_tau_mean']:.2f}, "
                 f"minimum {figures['kendall_tau_min']:.2f}")
    if figures.get("left_out"):
        text += f" (left out, not finished in every repeat: {', '.join(figures['left_out'])})"
    return text
