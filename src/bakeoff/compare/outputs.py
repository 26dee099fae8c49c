"""Write a run's comparison from the store: results.csv, relative.csv, the two plots and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bakeoff.compare.plots import plot_tradeoffs
from bakeoff.compare.recommend import LATENCIES
from bakeoff.compare.repeats import (BY_REPEAT_COLUMNS, by_repeat_frame, pool_repeats, repeats_of, result_columns,
                                     stability)
from bakeoff.compare.report_html import write_reports
from bakeoff.compare.tables import (RELATIVE_COLUMNS, chance_warning, pick_baseline, relative_frame,
                                    results_frame, small_split_warning, weights_warning)
from bakeoff.errors import BakeoffError
from bakeoff.store import Store

__all__ = ["write_outputs", "Comparison", "INFERENCE_COLUMNS"]

# `report --inference`: which latency is the inference time (relative_inference_time, plots, Pareto).
INFERENCE_COLUMNS = {kind: cols[0] for kind, cols in LATENCIES.items()}
_MEASURE_HINT = {"endpoint": "run `bakeoff run ... --endpoint-latency 100`",
                 "onnx-cpu": "run `bakeoff export OUT --model ID --format onnx`"}


class Comparison:
    """The figures of one run: ``results`` (absolute), ``relative`` (to ``baseline``)."""

    def __init__(self, results: pd.DataFrame, relative: pd.DataFrame | None, baseline: str | None,
                 run: dict, warning: str | None = None, inference: str = "in-process",
                 stability: dict | None = None) -> None:
        self.results, self.relative, self.baseline, self.run, self.warning = results, relative, baseline, run, warning
        self.inference = inference  # which latency is the inference time (a key of LATENCIES)
        self.stability = stability  # with repeats: how far they agree on the ranking (compare.repeats)

    def frame(self) -> pd.DataFrame:
        """results joined with the relative columns, one row per model; ``val_pred`` and
        ``val_true`` hold each validation image's predicted and true class (for paired tests).
        With repeats, rows are pooled (``compare.repeats.pool_repeats``): ``accuracy_by_repeat``
        holds each repeat's accuracy, and the per-image columns are empty."""
        results = self.results.drop(columns=["accuracy_resamples"], errors="ignore")  # the tests' raw draws
        if self.relative is None:
            return results
        cols = ["model", "relative_accuracy", "relative_training_time", "relative_inference_time", "pareto"]
        return results.merge(self.relative[cols], on="model", how="left")


def write_outputs(out_dir, baseline: str | None = None, plots: bool = True, inference: str = "in-process"
                  ) -> Comparison:
    """Rebuild the comparison of the latest run in ``out_dir/bakeoff.db`` without training.

    ``inference`` picks the latency compared: in-process, endpoint (HTTP) or onnx-cpu.
    """
    if inference not in INFERENCE_COLUMNS:
        raise BakeoffError(f"--inference must be one of {', '.join(INFERENCE_COLUMNS)}, got {inference!r}")
    out_dir = Path(out_dir)
    db = out_dir / "bakeoff.db"
    if not db.exists():
        raise BakeoffError(f"{db} does not exist: pass the --out folder of an earlier `bakeoff run`")
    run, trials = Store(db).latest_trials()
    if run is None:
        raise BakeoffError(f"{db} holds no run yet: start one with `bakeoff run`")
    order = list(run["trial_keys"])
    if baseline and baseline not in order:  # asked for by name: the user must choose again
        raise BakeoffError(f"--baseline {baseline} is not a model of this run; models: {', '.join(order)}")
    repeats = repeats_of(run)
    ranking = None
    if repeats > 1:  # one pooled row per model; every repeat's own row beside it
        by_repeat = by_repeat_frame(trials, order, run)
        by_repeat[BY_REPEAT_COLUMNS].to_csv(out_dir / "results_by_repeat.csv", index=False)
        results = pool_repeats(by_repeat, order)
        ranking = stability(results)
        if ranking is not None:
            (out_dir / "stability.json").write_text(json.dumps(ranking, indent=2))
    else:
        results = results_frame(trials, order)
    if ranking is None:  # what an earlier run with repeats left would be taken for this run's
        (out_dir / "stability.json").unlink(missing_ok=True)
    if repeats == 1:
        (out_dir / "results_by_repeat.csv").unlink(missing_ok=True)
    relative, used, warning = None, None, None
    if (results["status"] == "ok").any():
        used, warning = pick_baseline(results, baseline or run.get("baseline"))
        relative, _ = relative_frame(results, used, INFERENCE_COLUMNS[inference])
        if inference != "in-process" and relative.loc[relative["baseline"], "relative_inference_time"].isna().all():
            raise BakeoffError(f"the baseline {used} has no {inference} latency in {db}: {_MEASURE_HINT[inference]}")
        results["p_vs_baseline"] = results["model"].map(relative.set_index("model")["p_vs_baseline"])
        relative[RELATIVE_COLUMNS].to_csv(out_dir / "relative.csv", index=False)
        if plots:
            plot_tradeoffs(relative, out_dir, f"{LATENCIES[inference][2]} p50")
    else:
        warning = "no model finished successfully: nothing to compare (see the error column of results.csv)"
    results[result_columns(results)].to_csv(out_dir / "results.csv", index=False)
    notes = (warning, chance_warning(results), weights_warning(results), small_split_warning(results, used),
             _missing_warning(run))
    warning = "\n".join(w for w in notes if w) or None  # one line each: the terminal and report list them
    comparison = Comparison(results, relative, used, run, warning, inference, ranking)
    write_reports(out_dir, comparison, trials)  # report.md, and report.html where plotly is installed
    return comparison


def _missing_warning(run: dict) -> str | None:
    """Names the run's models with no result yet (``run["missing"]``, from the store)."""
    missing, partly = run.get("missing") or [], run.get("missing_repeats") or []
    if not missing and not partly:
        return None
    why = {"running": "still being trained by the run writing this folder",
           "interrupted": "the run was interrupted before training them: run the same command again"}
    what = [f"{len(missing)} of {len(run['trial_keys'])} models have no result ({', '.join(missing)})"] \
        if missing else []
    what += [f"{len(partly)} repeats have no result ({', '.join(f'{m} repeat {r}' for m, r in partly)})"] \
        if partly else []
    return "; ".join(what) + ": " + why.get(run.get("status"), "not trained")
