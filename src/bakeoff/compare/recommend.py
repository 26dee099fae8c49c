"""Recommendations in words, computed from the results table: which model to pick, and how sure.

Four questions, each answered with the figures behind it: the most accurate model; the fastest
to train among models within one accuracy point of the best; the fastest at inference among
those (one answer per measured latency); the most accurate model of each framework. Each answer
names its runner-up and says whether the pick is better than it or not distinguishable from it,
by the exact McNemar test on the same validation images at 5% (a warning when that undercuts
the pick). With repeats the test is the paired bootstrap over images and repeats, and each
answer says in how many repeats its pick won.

>>> recs = recommend(results)  # doctest: +SKIP
>>> print(recs[0].text)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bakeoff.compare.tables import at_chance, same_images_cells
from bakeoff.measure import ALPHA, mcnemar_p, resampled_paired

__all__ = ["Recommendation", "Pick", "recommend", "LATENCIES", "available_latencies", "fmt_pct", "fmt_ci",
           "fmt_seconds", "fmt_ms", "fmt_p", "fmt_p_value", "is_number", "as_number", "versus"]

# latency kind -> (p50 column, p95 column, what was timed)
LATENCIES: dict[str, tuple[str, str, str]] = {
    "in-process": ("latency_ms_p50", "latency_ms_p95", "in-process batch-1 latency"),
    "endpoint": ("endpoint_latency_ms_p50", "endpoint_latency_ms_p95", "HTTP endpoint latency"),
    "onnx-cpu": ("onnx_cpu_latency_ms_p50", "onnx_cpu_latency_ms_p95", "ONNX Runtime CPU latency"),
}


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_pct(v, digits: int = 1) -> str:
    return f"{100 * v:.{digits}f}%" if is_number(v) else "–"


def fmt_ci(lo, hi, digits: int = 1) -> str:
    return f"{100 * lo:.{digits}f}–{100 * hi:.{digits}f}%" if is_number(lo) and is_number(hi) else "–"


def fmt_p_value(v, missing: str = "–") -> str:
    """A p-value for a table cell: two significant digits, "< 0.001" below that."""
    if not is_number(v):
        return missing
    return "< 0.001" if v < 0.001 else f"{v:.2g}"


def fmt_p(v) -> str:
    """A p-value in a sentence: "p = 0.031", "p < 0.001"."""
    text = fmt_p_value(v)
    return text if not is_number(v) else f"p {text}" if text.startswith("<") else f"p = {text}"


def fmt_seconds(v) -> str:
    if not is_number(v):
        return "–"
    if v < 10:
        return f"{v:.2f} s"
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{int(v // 60)} min {int(round(v % 60)):02d} s"
    return f"{int(v // 3600)} h {int(round(v % 3600 / 60)):02d} min"


def fmt_ms(v) -> str:
    if not is_number(v):
        return "–"
    return f"{v:.3f} ms" if v < 1 else f"{v:.2f} ms" if v < 100 else f"{v:,.0f} ms"


@dataclass(frozen=True)
class Pick:
    """One model's figures as the recommendations quote them."""

    model: str
    framework: str
    accuracy: float
    ci_low: float | None
    ci_high: float | None
    train_time_s: float | None
    latency_ms: float | None = None

    def accuracy_text(self) -> str:
        return f"{fmt_pct(self.accuracy)} (95% CI {fmt_ci(self.ci_low, self.ci_high)})"


@dataclass(frozen=True)
class Recommendation:
    """``kind`` is most-accurate, fastest-training, fastest-inference or best-of-framework."""

    kind: str
    title: str
    pick: Pick
    runner_up: Pick | None
    text: str
    warning: str | None = None
    latency: str | None = None
    framework: str | None = None


def versus(a, b) -> tuple[str, str] | None:
    """How results row ``a`` compares with row ``b`` on the same validation images, by the exact
    McNemar test at 5%: ("better than" | "worse than" | "not distinguishable from", the test's
    figures in words); None where per-image predictions are missing for either. Rows pooled over
    repeats are compared by their joint resamples over images and repeats instead."""
    ra, rb = a.get("accuracy_resamples"), b.get("accuracy_resamples")
    if isinstance(ra, np.ndarray) and isinstance(rb, np.ndarray):
        p = resampled_paired(ra, rb)[0]
        better = float(a["accuracy"]) > float(b["accuracy"])
        verdict = "not distinguishable from" if not p < ALPHA else "better than" if better else "worse than"
        return verdict, (f"{fmt_p(p)}, paired bootstrap over the same {int(a['n_val'])} validation images and "
                         f"{len(a['accuracy_by_repeat'])} repeats")
    cells = same_images_cells(a, b)
    if cells is None:
        return None
    p = mcnemar_p(cells[1], cells[2])
    verdict = "not distinguishable from" if p >= ALPHA else "better than" if cells[1] > cells[2] else "worse than"
    return verdict, (f"{fmt_p(p)}, exact McNemar test on the same {sum(cells)} validation images: {cells[1]} "
                     f"right only for {a['model']}, {cells[2]} only for {b['model']}")


def as_number(v) -> float | None:
    """A finite float, or None for anything else (None, NaN, text)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _pick(row, latency_col: str | None = None) -> Pick:
    return Pick(model=str(row["model"]), framework=str(row["framework"]), accuracy=float(row["accuracy"]),
                ci_low=as_number(row.get("accuracy_ci_low")), ci_high=as_number(row.get("accuracy_ci_high")),
                train_time_s=as_number(row.get("train_time_s")),
                latency_ms=as_number(row.get(latency_col)) if latency_col else None)


def _successful(results: pd.DataFrame) -> pd.DataFrame:
    ok = results[(results["status"] == "ok") & ~at_chance(results)].copy()
    ok["accuracy"] = pd.to_numeric(ok["accuracy"], errors="coerce")
    ok = ok[ok["accuracy"].notna()]
    ok["_order"] = range(len(ok))
    return ok


def available_latencies(results: pd.DataFrame) -> list[str]:
    """Latency kinds measured for at least one successful model, in ``LATENCIES`` order."""
    ok = results[results["status"] == "ok"]
    return [k for k, (p50, _, _) in LATENCIES.items()
            if p50 in ok.columns and pd.to_numeric(ok[p50], errors="coerce").notna().any()]


def _by_accuracy(rows: pd.DataFrame) -> pd.DataFrame:
    """Most accurate first; ties go to the faster-training model, then to the listed order."""
    t = pd.to_numeric(rows["train_time_s"], errors="coerce").fillna(math.inf)
    return rows.assign(_t=t).sort_values(["accuracy", "_t", "_order"], ascending=[False, True, True])


def _most_accurate(ok: pd.DataFrame, kind: str, title: str, framework: str | None = None) -> Recommendation:
    ranked = _by_accuracy(ok)
    pick = _pick(ranked.iloc[0])
    runner_up = _pick(ranked.iloc[1]) if len(ranked) > 1 else None
    scope = f"of the {framework} models" if framework else "of all models"
    text = f"{pick.model} is the most accurate {scope}: {pick.accuracy_text()}"
    if pick.train_time_s is not None:
        text += f", trained in {fmt_seconds(pick.train_time_s)}"
    text += repeat_wins(ranked.iloc[0], ok, p_best=framework is None)
    warning = None
    if runner_up is not None:
        text += f"; runner-up {runner_up.model} at {fmt_pct(runner_up.accuracy)}"
        test = versus(ranked.iloc[0], ranked.iloc[1])
        if test is None:
            warning = (f"not tested against the runner-up {runner_up.model}: per-image predictions are missing "
                       f"for one of them (stored by an earlier version), so nothing says it is the better one")
        elif test[0] == "better than":
            text += f"; better than it ({test[1]})"
        else:  # "worse than" only where the stored accuracies disagree with the stored answers
            warning = (f"{test[0]} the runner-up {runner_up.model}: {fmt_pct(pick.accuracy)} vs "
                       f"{fmt_pct(runner_up.accuracy)}, {test[1]}")
            if test[0] == "not distinguishable from":
                warning += "; more validation images would be needed to tell them apart"
    return Recommendation(kind, title, pick, runner_up, text + ".", warning, framework=framework)


def repeat_wins(pick, rows: pd.DataFrame, within: float = 0.0, p_best: bool = False) -> str:
    """With repeats: "; it won in 4 of 5 repeats" (the most accurate of ``rows`` in a repeat, or
    within ``within`` of that repeat's best), and the pick's ``p_best`` where asked; else ""."""
    mine = pick.get("accuracy_by_repeat")
    if not isinstance(mine, list) or len(mine) < 2:
        return ""
    accs = np.array([list(a) for a in rows["accuracy_by_repeat"]], dtype=float)
    finished = ~np.isnan(np.asarray(mine, dtype=float))
    with np.errstate(invalid="ignore"):
        best = np.nanmax(np.where(np.isnan(accs), -np.inf, accs), axis=0)
    won = int((np.asarray(mine, dtype=float)[finished] >= best[finished] - within - 1e-12).sum())
    what = "the most accurate" if within == 0 else f"within {_points(within)} of the best"
    text = f"; {what} in {won} of {int(finished.sum())} repeats"
    share = as_number(pick.get("p_best")) if p_best else None
    if share is not None:
        text += f" and in {100 * share:.0f}% of resamples over images and repeats (p_best)"
    return text


def _points(within: float) -> str:
    return f"{100 * within:g} point{'' if abs(within - 0.01) < 1e-12 else 's'}"


def _fastest(ok: pd.DataFrame, best: Pick, col: str, kind: str, title: str, what: str, fmt, within: float,
             latency: str | None = None) -> Recommendation | None:
    cost = pd.to_numeric(ok[col], errors="coerce")
    near = ok[(ok["accuracy"] >= best.accuracy - within - 1e-12) & cost.notna()].assign(_cost=cost)
    if near.empty:
        return None
    ranked = near.sort_values(["_cost", "accuracy", "_order"], ascending=[True, False, True])
    lat_col = col if latency else None
    pick = _pick(ranked.iloc[0], lat_col)
    runner_up = _pick(ranked.iloc[1], lat_col) if len(ranked) > 1 else None
    pick_cost = float(ranked["_cost"].iloc[0])
    if runner_up is None:
        text = (f"only {pick.model} is within {_points(within)} of the best accuracy, so it is the pick here too "
                f"({fmt(pick_cost)})")
    else:
        ratio = float(ranked["_cost"].iloc[1]) / pick_cost if pick_cost > 0 else math.inf
        text = (f"{pick.model} is the fastest {what} ({fmt(pick_cost)}) of the {len(ranked)} models within "
                f"{_points(within)} of the best accuracy; accuracy {pick.accuracy_text()}")
        text += f" vs {fmt_pct(best.accuracy)} for {best.model}" if pick.model != best.model else \
            ", the best of all"
        text += f"; the next fastest, {runner_up.model}, takes {ratio:.2f}x as long"
    text += repeat_wins(ranked.iloc[0], ok, within)
    warning = None
    test = versus(ranked.iloc[0], ranked.iloc[1]) if runner_up is not None else None
    if test is not None and test[0] == "worse than":
        warning = (f"the next fastest, {runner_up.model}, is more accurate: {fmt_pct(runner_up.accuracy)} vs "
                   f"{fmt_pct(pick.accuracy)}, {test[1]}")
    elif test is not None:
        text += f"; its accuracy is {test[0]} {runner_up.model}'s ({test[1]})"
    return Recommendation(kind, title, pick, runner_up, text + ".", warning, latency=latency)


def recommend(results: pd.DataFrame, within: float = 0.01) -> list[Recommendation]:
    """The recommendations for ``results`` (results.csv's columns); failed trials, and trials whose
    accuracy is not above chance, are ignored.

    ``within`` is the accuracy margin of the speed picks, as a fraction (0.01 = one point).
    Returns an empty list when no model finished above chance.
    """
    ok = _successful(results)
    if ok.empty:
        return []
    recs = [_most_accurate(ok, "most-accurate", "Most accurate")]
    best = recs[0].pick
    near = f"within {_points(within)} of the best"
    fast = _fastest(ok, best, "train_time_s", "fastest-training", f"Fastest to train, {near}", "to train",
                    fmt_seconds, within)
    if fast is not None:
        recs.append(fast)
    for kind in available_latencies(ok):
        p50, _, label = LATENCIES[kind]
        rec = _fastest(ok, best, p50, "fastest-inference", f"Fastest inference by {label}, {near}",
                       "at inference", lambda v, label=label: f"{fmt_ms(v)} median {label}", within,
                       latency=kind)
        if rec is not None:
            recs.append(rec)
    for fw in dict.fromkeys(ok["framework"]):
        recs.append(_most_accurate(ok[ok["framework"] == fw], "best-of-framework", f"Best {fw} model",
                                   framework=fw))
    return recs
