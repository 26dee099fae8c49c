"""The comparison as a table of formatted cells (shared by the HTML page) and as Markdown (report.md).

>>> text = report_markdown(comparison, recommend(comparison.results))  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from bakeoff.compare.recommend import (LATENCIES, Recommendation, as_number, available_latencies, fmt_ci, fmt_ms,
                                       fmt_p_value, fmt_pct, fmt_seconds, is_number)
from bakeoff.compare.tables import display_status, figure_kind, relative_frame, weights_kind
from bakeoff.errors import BakeoffError

__all__ = ["Cell", "Column", "figure_table", "relative_by_latency", "report_markdown", "run_summary",
           "dataset_warnings", "LATENCY_SHORT"]

LATENCY_SHORT = {"in-process": "in-process", "endpoint": "endpoint", "onnx-cpu": "ONNX CPU"}


@dataclass(frozen=True)
class Cell:
    """What a table cell shows, and the raw value it sorts by (None sorts last)."""

    text: str
    sort: float | str | None = None


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    help: str = ""
    latency: str | None = None  # shown only while this latency is selected (HTML)


def relative_by_latency(comparison) -> dict[str, pd.DataFrame]:
    """The relative frame for each latency kind the baseline was measured with; the kind that
    ``comparison.relative`` was computed with comes first (it is the one shown by default)."""
    if comparison.relative is None or comparison.baseline is None:
        return {}
    res = comparison.results
    base = res[res["model"] == comparison.baseline]
    out = {}
    for kind in available_latencies(res):
        p50 = LATENCIES[kind][0]
        if base.empty or as_number(base[p50].iloc[0]) is None:
            continue
        try:
            out[kind] = relative_frame(res, comparison.baseline, inference=p50)[0]
        except BakeoffError:
            continue
    used = comparison.relative.set_index("model")["relative_inference_time"].astype(float)
    for kind, frame in out.items():
        mine = frame.set_index("model")["relative_inference_time"].astype(float).reindex(used.index)
        if np.allclose(mine, used, equal_nan=True):
            return {kind: frame} | {k: f for k, f in out.items() if k != kind}
    return out


def _pareto_text(r) -> str:
    fronts = [name for name, col in (("training", "pareto_training"), ("inference", "pareto_inference"))
              if bool(r.get(col))]
    return " + ".join(fronts)


def figure_table(comparison, rel_by_latency: dict[str, pd.DataFrame]) -> tuple[list[Column], list[dict]]:
    """Columns and rows (``{column key: Cell}``) of absolute and relative figures, failed rows included."""
    res = comparison.results
    kinds = available_latencies(res)
    cols = [Column("model", "model"), Column("framework", "framework"), Column("status", "status"),
            Column("weights", "weights", "starting weights: imagenet, random-init, or file (ImageNet weights "
                   "from a local file)"),
            Column("accuracy", "accuracy (95% CI)", "top-1 on the whole validation split; Wilson interval"
                   if "repeats" not in res.columns else "mean top-1 over the repeats; the interval adds the spread "
                   "between repeats to the validation sample's (README, Measurements)"),
            Column("rel_accuracy", "rel. accuracy (95% CI)", "accuracy / baseline accuracy; paired bootstrap "
                   "interval over the validation images"),
            Column("p_vs_baseline", "p vs baseline", "exact McNemar test against the baseline on the same "
                   "validation images; below 0.05: distinguishable from it"),
            Column("train_time", f"training time ({figure_kind(res, 'train_time_kind')})",
                   "the protocol's training steps with the device to the trial alone, on the kernels it ended "
                   "with; one-off work (building, compiling, capture, evaluation, saving) excluded"),
            Column("rel_training", "rel. training time", "training time / baseline training time")]
    for k in kinds:
        form = f", {figure_kind(res, 'latency_kind')}" if k == "in-process" else ""
        cols.append(Column(f"latency:{k}", f"{LATENCY_SHORT[k]} latency p50 / p95{form}",
                           f"{LATENCIES[k][2]}{form}, median and 95th percentile"))
    for k in rel_by_latency:
        cols.append(Column(f"rel_inference:{k}", f"rel. inference time ({LATENCY_SHORT[k]})",
                           f"{LATENCIES[k][2]} / the baseline's", latency=k))
        cols.append(Column(f"pareto:{k}", "Pareto front",
                           "on the best trade-off of accuracy against training or inference time", latency=k))
    cols += [Column("throughput", "throughput img/s", "batch-64 inference throughput"),
             Column("top5", "top-5"), Column("macro_f1", "macro-F1"), Column("params", "params"),
             Column("size", "size MB")]
    cols.append(Column("error", "error"))
    rels = {k: rel.set_index("model") for k, rel in rel_by_latency.items()}
    rows = []
    statuses = display_status(res)
    for i, r in res.iterrows():
        model = r["model"]
        status = statuses[i]
        acc, lo, hi = as_number(r["accuracy"]), as_number(r["accuracy_ci_low"]), as_number(r["accuracy_ci_high"])
        row = {"model": Cell(model + (" (baseline)" if model == comparison.baseline else ""), model),
               "framework": Cell(str(r["framework"]), str(r["framework"])),
               "status": Cell(status, status),
               "weights": Cell(weights_kind(r.get("weights")) or "–", weights_kind(r.get("weights"))),
               "accuracy": Cell(f"{fmt_pct(acc)} ({fmt_ci(lo, hi)})" if acc is not None else "–", acc),
               "top5": Cell(fmt_pct(as_number(r["top5"])), as_number(r["top5"])),
               "macro_f1": Cell(f"{as_number(r['macro_f1']):.3f}" if as_number(r["macro_f1"]) is not None else "–",
                                as_number(r["macro_f1"])),
               "train_time": Cell(fmt_seconds(as_number(r["train_time_s"])), as_number(r["train_time_s"]))}
        sd = as_number(r.get("accuracy_sd"))
        if acc is not None and sd is not None:  # pooled over repeats: their spread too
            row["accuracy"] = Cell(f"{fmt_pct(acc)} ({fmt_ci(lo, hi)}), sd {fmt_pct(sd)} ({r['repeats']} repeats)", acc)
        for k in kinds:
            p50, p95 = as_number(r.get(LATENCIES[k][0])), as_number(r.get(LATENCIES[k][1]))
            both = p50 is not None and p95 is not None
            text = f"{fmt_ms(p50).removesuffix(' ms')} / {fmt_ms(p95)}" if both else fmt_ms(p50)
            row[f"latency:{k}"] = Cell(text, p50)
        tp, params, size = as_number(r["throughput_img_s"]), as_number(r["params"]), as_number(r["size_mb"])
        row["throughput"] = Cell(f"{tp:,.0f}" if tp is not None else "–", tp)
        row["params"] = Cell(f"{params / 1e6:.2f} M" if params is not None else "–", params)
        row["size"] = Cell(f"{size:.1f}" if size is not None else "–", size)
        first = next(iter(rels.values()), None)
        rel = first.loc[model] if first is not None and model in first.index else None
        if rel is not None:
            ra, rlo, rhi = (as_number(rel[c]) for c in ("relative_accuracy", "relative_accuracy_ci_low",
                                                   "relative_accuracy_ci_high"))
            both = rlo is not None and rhi is not None
            row["rel_accuracy"] = Cell(f"{ra:.3f} ({rlo:.3f}–{rhi:.3f})" if both else f"{ra:.3f}", ra)
            p = as_number(rel["p_vs_baseline"])
            row["p_vs_baseline"] = Cell(fmt_p_value(p), p)
            rt = as_number(rel["relative_training_time"])
            row["rel_training"] = Cell(f"{rt:.2f}x" if rt is not None else "–", rt)
        for k, frame in rels.items():
            rk = frame.loc[model] if model in frame.index else None
            ri = as_number(rk["relative_inference_time"]) if rk is not None else None
            row[f"rel_inference:{k}"] = Cell(f"{ri:.2f}x" if ri is not None else "–", ri)
            pareto = _pareto_text(rk) if rk is not None else ""
            row[f"pareto:{k}"] = Cell(pareto, pareto or None)
        err = r["error"] if isinstance(r["error"], str) else ""
        row["error"] = Cell(err, err or None)
        rows.append({c.key: row.get(c.key, Cell("–")) for c in cols})
    return cols, rows


def run_summary(comparison) -> str:
    """One sentence: how many models, on which data, with which protocol, against which baseline."""
    ds, p = comparison.run.get("dataset", {}), comparison.run.get("protocol", {})
    name = Path(ds.get("data_dir") or "the data set").name
    n_ok = int((comparison.results["status"] == "ok").sum())
    n = len(comparison.results)
    n_classes = len(ds.get("classes", []))
    text = (f"{n} model{'s' if n != 1 else ''} ({n_ok} finished) fine-tuned on {name} ({n_classes} classes, "
            f"{ds.get('n_train', '?')} training and {ds.get('n_val', '?')} validation images) with one protocol: "
            f"{p.get('epochs')} epochs, {p.get('optimizer')}, learning rate {p.get('lr')}, batch size "
            f"{p.get('batch_size')}")
    if p.get("train_only_top_layer"):
        text += ", only the top layer trained"
    if (p.get("val_every") or 1) > 1:
        text += f", the validation split scored every {p['val_every']} epochs and after the last"
    if p.get("image_size"):
        text += f", every image at {p['image_size']} px"
    text += "."
    if comparison.baseline:
        text += f" Relative figures divide by the baseline, {comparison.baseline} (= 1.00)."
    return text


def dataset_warnings(dataset: dict) -> list[str]:
    """The data set's own warnings (``dataset.json``'s ``warnings``: a class with too few images,
    a validation class left empty, ...); none for runs recorded before they were kept."""
    return [str(w) for w in dataset.get("warnings") or []]


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _when(ts) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if is_number(ts) else "?"


def report_markdown(comparison, recommendations: list[Recommendation]) -> str:
    """report.md: the summary, the recommendations, the figures table, failures and provenance."""
    run = comparison.run
    lines = ["# bakeoff: which model to fine-tune", "", run_summary(comparison), ""]
    for note in (comparison.warning or "").splitlines():
        lines += [f"> **Note:** {_md(note)}", ""]
    lines += ["## Recommendations", ""]
    if not recommendations:
        lines.append("No model finished above chance accuracy, so there is nothing to recommend (see the note "
                     "above and the errors below).")
    for rec in recommendations:
        lines.append(f"- **{rec.title}:** {_md(rec.text)}")
        if rec.warning:
            lines.append(f"  - *Warning:* {_md(rec.warning)}.")
    verdict = (getattr(comparison, "stability", None) or {}).get("verdict")
    if verdict:
        lines += ["", f"**Rank stability:** {_md(verdict)}."]
    rel = relative_by_latency(comparison)
    cols, rows = figure_table(comparison, rel)
    keep = {"model", "framework", "status", "weights", "accuracy", "train_time", "rel_accuracy", "p_vs_baseline",
            "rel_training"}
    shown = [c for c in cols if c.key in keep or c.key.startswith(("latency:", "rel_inference:"))]
    if rel:
        first = next(iter(rel))
        pareto = next(c for c in cols if c.key == f"pareto:{first}")
        shown.append(replace(pareto, header=f"Pareto front ({LATENCY_SHORT[first]})") if len(rel) > 1 else pareto)
    lines += ["", "## Results", "", "| " + " | ".join(_md(c.header) for c in shown) + " |",
              "|" + "|".join("---" if c.key in ("model", "framework", "status", "weights") else "---:" for c in shown)
              + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_md(row[c.key].text) for c in shown) + " |")
    failed = comparison.results[comparison.results["status"] != "ok"]
    if not failed.empty:
        lines += ["", "### Failed trials", ""]
        lines += [f"- {r['model']}: `{_md(r['error'] or 'no error recorded')}`" for _, r in failed.iterrows()]
    ds, prov = run.get("dataset", {}), run.get("provenance", {})
    libs = ", ".join(f"{k} {v}" for k, v in prov.get("libraries", {}).items())
    wall = (run.get("finished") or 0) - (run.get("started") or 0) if run.get("finished") else None
    devices = sorted({str(d) for d in comparison.results["device_name"].dropna()})
    lines += ["", "## Provenance", "",
              f"- data set: `{ds.get('data_dir', '?')}`, fingerprint {ds.get('fingerprint', '?')}, "
              f"{len(ds.get('classes', []))} classes, {ds.get('n_train', '?')} training / "
              f"{ds.get('n_val', '?')} validation images, {ds.get('n_skipped', 0)} files skipped",
              *(f"- data set warning: {_md(w)}" for w in dataset_warnings(ds)),
              "- protocol: " + ", ".join(f"{k}={v}" for k, v in run.get("protocol", {}).items()),
              f"- device: {', '.join(devices) or prov.get('device', '?')}",
              f"- bakeoff {prov.get('bakeoff_version', '?')} (commit {prov.get('bakeoff_commit') or '?'}), "
              f"Python {prov.get('python', '?')}; {libs}",
              f"- run: {_when(run.get('started'))} to {_when(run.get('finished'))}, wall time {fmt_seconds(wall)}",
              f"- command: `{_md(run.get('command') or '?')}`", ""]
    return "\n".join(lines)
